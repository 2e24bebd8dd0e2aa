"""The papers' sampling settings, by name: what each paper's reported numbers were sampled with.

``maskdiff sample --preset NAME`` and ``maskdiff evaluate --preset NAME`` take one; options given on the command line
still win, and the preset (its values and its source) is written to ``samples.json``.

The official DiT and MDT code guide only the first 3 of the 4 latent channels (``forward_with_cfg``, a
reproducibility quirk); their presets do the same. maskdiff's library default (``ClassifierFreeGuidance(channels=None)``)
is the standard all-channel formulation, which UMD's official code uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from maskdiff.diffusion.schedules import Spacing
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddim import DDIMSampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance


@dataclass(frozen=True)
class SamplingPreset:
    """One paper's sampling protocol.

    Attributes:
        name: what ``--preset`` takes.
        paper: the result it reproduces and where the setting comes from.
        sampler, steps, eta: the sampler (``ddpm`` or ``ddim``), respaced steps and DDIM's η.
        cfg_scale, cfg_channels, cfg_schedule, cfg_power: classifier-free guidance (channels ``None``: all).
        vae: the VAE the paper decoded with (a local ``AutoencoderKL`` directory of that name is expected).
        num_samples: how many samples the reported FID used.
        spacing: the sampler's timestep spacing (``big_vision`` for UMD's DDIM loop, ``adm`` otherwise).
    """

    name: str
    paper: str
    sampler: Literal["ddpm", "ddim"]
    steps: int
    eta: float
    cfg_scale: float
    cfg_channels: int | None
    cfg_schedule: Literal["constant", "power_cosine"]
    cfg_power: float
    vae: str
    num_samples: int
    spacing: Spacing = "adm"

    def make_sampler(self) -> Sampler:
        return DDIMSampler(self.steps, self.eta, self.spacing) if self.sampler == "ddim" else DDPMSampler(self.steps)

    def make_guidance(self) -> ClassifierFreeGuidance:
        return ClassifierFreeGuidance(self.cfg_scale, self.cfg_channels, self.cfg_schedule, self.cfg_power)

    def record(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, SamplingPreset] = {preset.name: preset for preset in (
    SamplingPreset("dit-xl2-cfg1.5", "DiT-XL/2 256² FID-50K 2.27 (sample_ddp.py: cfg 1.5, 250 DDPM steps, ema VAE)",
                   "ddpm", 250, 0.0, 1.5, 3, "constant", 4.0, "sd-vae-ft-ema", 50_000),
    SamplingPreset("dit-xl2-cfg4.0", "DiT-XL/2 256² visual samples (sample.py: cfg 4.0, 250 DDPM steps, mse VAE)",
                   "ddpm", 250, 0.0, 4.0, 3, "constant", 4.0, "sd-vae-ft-mse", 50_000),
    SamplingPreset("mdt-xl2", "MDT-XL/2 FID-50K 1.79 and MDTv2-XL/2 1.58 (image_sample.py: power-cosine cfg 3.8, "
                   "power 4, 250 DDPM steps, ema VAE)", "ddpm", 250, 0.0, 3.8, 3, "power_cosine", 4.0,
                   "sd-vae-ft-ema", 50_000),
    SamplingPreset("umd-cfg2.0", "UMD generation eval (ae_i1k sample_cfg_1_5, which runs cfg 2.0 on all channels; "
                   "DDIM-125, η 1; 10K samples vs ImageNet validation statistics)", "ddim", 125, 1.0, 2.0, None,
                   "constant", 4.0, "stable-diffusion-v1-5/vae", 10_000, "big_vision"),
    SamplingPreset("umd-cfg4.0", "UMD generation eval (ae_i1k sample_cfg_4: cfg 4.0 on all channels; DDIM-125, η 1)",
                   "ddim", 125, 1.0, 4.0, None, "constant", 4.0, "stable-diffusion-v1-5/vae", 10_000, "big_vision"),
)}


def preset(name: str) -> SamplingPreset:
    """The preset called ``name``, or a ValueError listing them."""
    if name not in PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
