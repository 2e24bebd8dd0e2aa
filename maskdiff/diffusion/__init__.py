"""Diffusion math shared by corruptions, objectives and samplers."""

from maskdiff.diffusion.parameterization import Parameterization, Prediction, to_eps, to_v, to_x0
from maskdiff.diffusion.schedules import NoiseSchedule, Spacing, big_vision_timesteps, space_timesteps

__all__ = [
    "NoiseSchedule", "Parameterization", "Prediction", "Spacing", "big_vision_timesteps", "space_timesteps", "to_eps",
    "to_v", "to_x0",
]
