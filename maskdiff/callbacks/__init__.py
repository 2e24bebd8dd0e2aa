"""Callbacks: sample grids, inpainting panels and run summaries (generative metrics and probes plug in here too)."""

from maskdiff.callbacks.data_health import DataHealth
from maskdiff.callbacks.digits_eval import DigitsEvaluation
from maskdiff.callbacks.generative_metrics import GenerativeMetrics
from maskdiff.callbacks.inpainting_panel import InpaintingPanel
from maskdiff.callbacks.linear_probe import OnlineLinearProbe
from maskdiff.callbacks.run_summary import RunSummary
from maskdiff.callbacks.sample_grid import SampleGrid, grid_labels, save_grid

__all__ = ["DataHealth", "DigitsEvaluation", "GenerativeMetrics", "InpaintingPanel", "OnlineLinearProbe", "RunSummary", "SampleGrid", "grid_labels", "save_grid"]
