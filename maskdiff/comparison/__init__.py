"""Side-by-side comparison of the methods on one data set, backbone size and budget (``maskdiff compare``):
settings, the runs' configs, the measured axes and the report."""

from maskdiff.comparison.axes import StepTimer, evaluate_inpainting, hidden_psnr, judge_generation, probe_representation
from maskdiff.comparison.settings import (
    FineTuneSettings,
    GenerationSettings,
    InpaintingSettings,
    MethodSettings,
    PretrainSettings,
    RepresentationSettings,
    GenerativeFineTuneSettings,
)

__all__ = ["FineTuneSettings", "GenerationSettings", "InpaintingSettings", "MethodSettings", "PretrainSettings",
           "RepresentationSettings", "StepTimer", "GenerativeFineTuneSettings", "evaluate_inpainting", "hidden_psnr",
           "judge_generation", "probe_representation"]
