"""UMD's DDIM: big_vision's timestep grid (999, 999 - 1000//steps, ..., then 0) and its sampling loop, while DiT/ADM's
respacing stays the default."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.diffusion import NoiseSchedule, big_vision_timesteps, space_timesteps
from maskdiff.methods import UMD
from maskdiff.samplers import DDIMSampler, DDPMSampler, Denoiser
from maskdiff.samplers.presets import PRESETS
from maskdiff.tools.sampling import build_sampler, sampler_record


def official_grid(steps: int, num_steps: int = 1000) -> list[int]:
    """``ddim_sample_loop``: ``arange(T-1, 0, -(T//steps))`` then 0, of which the loop visits the first steps + 1."""
    reference = list(range(num_steps - 1, 0, -(num_steps // steps))) + [0]
    return reference[: steps + 1]


@pytest.mark.parametrize("steps", [125, 250, 50, 10, 3, 1])
def test_grid_is_big_visions_for_step_counts_dividing_t(steps):
    grid = big_vision_timesteps(1000, steps)
    assert grid[::-1] == official_grid(steps)
    assert grid[::-1] == [999 - k * (1000 // steps) for k in range(steps)] + [0]
    assert len(grid) == steps + 1


def test_grid_for_125_steps_and_other_counts():
    assert big_vision_timesteps(1000, 125)[::-1][:3] == [999, 991, 983]
    assert big_vision_timesteps(1000, 125)[:3] == [0, 7, 15]
    # 7 does not divide 1000: the official loop stops at 999 - 7 * 142 = 5 and calls it t = 0; this grid steps to 0
    assert big_vision_timesteps(1000, 7)[::-1] == [999, 857, 715, 573, 431, 289, 147, 0]
    assert official_grid(7)[-1] == 5
    with pytest.raises(ValueError, match="1 to 1000 steps, got 0"):
        big_vision_timesteps(1000, 0)


def test_respacing_rule_is_an_option_and_adm_stays_the_default():
    schedule = NoiseSchedule("cosine", 1000)
    adm = schedule.respace(125)
    assert adm.timestep_map.tolist() == space_timesteps(1000, 125) and adm.num_steps == 125
    big = schedule.respace(125, "big_vision")
    assert big.timestep_map.tolist() == big_vision_timesteps(1000, 125) and big.num_steps == 126
    torch.testing.assert_close(big.alphas_cumprod, schedule.alphas_cumprod[big.timestep_map], rtol=1e-12, atol=0)
    assert DDIMSampler(125).spacing == DDPMSampler(250).spacing == "adm"
    with pytest.raises(ValueError, match="'trailing'"):
        schedule.respace(10, "trailing")
    with pytest.raises(ValueError, match="'trailing'"):
        DDIMSampler(10, spacing="trailing")


class TimeDependentEps(nn.Module):
    """ε̂ = ½·tanh(x)·(1 + model_t/1000): any error in the timesteps or ᾱ the sampler uses changes the result."""

    num_classes = 0

    def forward(self, x_t, t, y=None, masking=None):
        return 0.5 * torch.tanh(x_t) * (1 + t.view(-1, 1, 1) / 1000)


def official_ddim_sample_loop(schedule, steps, eta, x, noises, clip):
    """big_vision's ``ddim_sample_loop`` + ``ddim_sample`` in float64 numpy, the model conditioned on t + 1 (UMD)."""
    abar = schedule.alphas_cumprod.numpy()
    reference = list(range(len(abar) - 1, 0, -(len(abar) // steps))) + [0]

    def eps_model(x, t):
        return 0.5 * np.tanh(x) * (1 + (t + 1) / 1000)

    def ddim_sample(x, t, t_next, noise):
        a = abar[t]
        x0 = math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * eps_model(x, t)
        x0 = np.clip(x0, -1, 1) if clip else x0
        eps = (math.sqrt(1 / a) * x - x0) / math.sqrt(1 / a - 1)
        a_prev = abar[t_next] if t_next is not None else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        mean = x0 * math.sqrt(a_prev) + math.sqrt(1 - a_prev - sigma**2) * eps
        return mean + (t > 0) * sigma * noise, x0

    for k in range(steps):
        x, _ = ddim_sample(x, reference[k], reference[k + 1], noises[k])
    return ddim_sample(x, 0, None, np.zeros_like(x))[1]


@pytest.mark.parametrize(("schedule_name", "steps", "clip"), [("cosine", 125, True), ("linear", 10, False)])
def test_ddim_with_big_vision_spacing_is_the_official_loop(schedule_name, steps, clip):
    schedule = NoiseSchedule(schedule_name, 1000)
    denoiser = Denoiser(TimeDependentEps(), schedule, "eps", clip_x0=1.0 if clip else None, time_offset=1)
    shape = (2, 4, 3)
    sample = DDIMSampler(steps, eta=1.0, spacing="big_vision").sample(denoiser, shape, None, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).double().numpy()
    noises = [torch.randn(shape, generator=generator).double().numpy() for _ in range(steps)]
    expected = official_ddim_sample_loop(schedule, steps, 1.0, x, noises, clip)
    np.testing.assert_allclose(sample.double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_umd_default_presets_and_overrides_keep_the_big_vision_grid():
    backbone = UMDBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, decoder_depth=1)
    default = UMD(backbone=backbone).sampler
    assert (default.steps, default.eta, default.spacing) == (125, 1.0, "big_vision")
    assert PRESETS["umd-cfg2.0"].make_sampler().spacing == PRESETS["umd-cfg4.0"].make_sampler().spacing == "big_vision"
    assert PRESETS["dit-xl2-cfg1.5"].make_sampler().spacing == "adm"
    overridden = build_sampler(default, steps=50, eta=0.0)
    assert (overridden.steps, overridden.eta, overridden.spacing) == (50, 0.0, "big_vision")
    assert sampler_record(overridden, "command line")["spacing"] == "big_vision"
