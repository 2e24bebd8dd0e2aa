"""The papers' sampling presets hold the official values (docs: shared reference algorithms.md, DiT/MDT/UMD sections)."""

from __future__ import annotations

import pytest

from maskdiff.samplers import DDIMSampler, DDPMSampler
from maskdiff.samplers.presets import PRESETS, preset


@pytest.mark.parametrize("name,kind,steps,eta,scale,channels,schedule,vae", [
    ("dit-xl2-cfg1.5", DDPMSampler, 250, 0.0, 1.5, 3, "constant", "sd-vae-ft-ema"),
    ("dit-xl2-cfg4.0", DDPMSampler, 250, 0.0, 4.0, 3, "constant", "sd-vae-ft-mse"),
    ("mdt-xl2", DDPMSampler, 250, 0.0, 3.8, 3, "power_cosine", "sd-vae-ft-ema"),
    ("umd-cfg2.0", DDIMSampler, 125, 1.0, 2.0, None, "constant", "stable-diffusion-v1-5/vae"),
    ("umd-cfg4.0", DDIMSampler, 125, 1.0, 4.0, None, "constant", "stable-diffusion-v1-5/vae"),
])
def test_presets_hold_the_papers_settings(name, kind, steps, eta, scale, channels, schedule, vae):
    chosen = preset(name)
    sampler, guidance = chosen.make_sampler(), chosen.make_guidance()
    assert isinstance(sampler, kind) and sampler.steps == steps
    if kind is DDIMSampler:
        assert sampler.eta == eta
    assert (guidance.scale, guidance.channels, guidance.schedule, guidance.power) == (scale, channels, schedule, 4.0)
    assert chosen.vae == vae and chosen.record()["name"] == name


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown sampling preset 'dit'; expected one of " + ", ".join(PRESETS)):
        preset("dit")
