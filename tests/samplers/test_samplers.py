import math

import pytest
import torch
from torch import nn

from maskdiff.backbones import create_backbone
from maskdiff.backbones.patching import Patchifier
from maskdiff.diffusion import NoiseSchedule
from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler, Denoiser, FirstStepSampler


class OracleBackbone(nn.Module):
    """The exact ε-predictor for data that is a single point ``target`` (per class when labels are given)."""

    def __init__(self, schedule, targets, learn_sigma=False):
        super().__init__()
        self.schedule, self.targets, self.learn_sigma = schedule, targets, learn_sigma
        self.num_classes = targets.shape[0]
        self.patchifier = Patchifier(4, 2, 1)

    def forward(self, x_t, t, y=None, masking=None):
        target = self.targets[y.clamp(max=self.num_classes - 1)] if y is not None else self.targets[0].expand_as(x_t)
        alpha, sigma = self.schedule.alpha_sigma(t.long(), x_t)
        eps = (x_t - alpha * target) / sigma
        return torch.cat([eps, torch.zeros_like(eps)], -1) if self.learn_sigma else eps


@pytest.mark.parametrize("sampler", [DDPMSampler(50), DDIMSampler(50, eta=0.0), DDIMSampler(25, eta=1.0)])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_samplers_recover_a_point_distribution(sampler, learn_sigma):
    schedule = NoiseSchedule("linear", 1000)
    targets = torch.randn(3, 4, 4) * 0.5
    denoiser = Denoiser(OracleBackbone(schedule, targets, learn_sigma), schedule, "eps", learn_sigma=learn_sigma)
    labels = torch.tensor([0, 1, 2, 1])
    out = sampler.sample(denoiser, (4, 4, 4), labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, targets[labels], atol=2e-3, rtol=0)


def test_same_seed_same_samples_and_ddim_eta0_is_deterministic_in_the_noise():
    schedule = NoiseSchedule("linear", 1000)
    model = create_backbone("DiT-Nano/2", input_size=4, in_channels=1, num_classes=3)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    denoiser = Denoiser(model.eval(), schedule, "eps", learn_sigma=True)
    labels = torch.tensor([0, 2])
    a = DDPMSampler(10).sample(denoiser, (2, 4, 4), labels, torch.Generator().manual_seed(3))
    b = DDPMSampler(10).sample(denoiser, (2, 4, 4), labels, torch.Generator().manual_seed(3))
    c = DDPMSampler(10).sample(denoiser, (2, 4, 4), labels, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    # DDIM η=0 only uses the initial noise: stepping it again from the same x_T gives the same result
    ddim = DDIMSampler(10, eta=0.0)
    d = ddim.sample(denoiser, (2, 4, 4), labels, torch.Generator().manual_seed(3))
    e = ddim.sample(denoiser, (2, 4, 4), labels, torch.Generator().manual_seed(3))
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def test_ddim_step_matches_formula():
    schedule = NoiseSchedule("linear", 1000)
    respaced = schedule.respace(10)
    targets = torch.randn(1, 4, 4)
    denoiser = Denoiser(OracleBackbone(schedule, targets), schedule, "eps")
    x = torch.randn(1, 4, 4)
    i = 5
    x_prev, out = DDIMSampler(10, eta=0.0).step(denoiser, respaced, i, x, torch.tensor([0]), None)
    abar_prev = respaced.alphas_cumprod[i - 1].item()
    expected = math.sqrt(abar_prev) * out.x0 + math.sqrt(1 - abar_prev) * out.eps
    torch.testing.assert_close(x_prev, expected)


class ConstantBackbone(nn.Module):
    """Outputs 1 for labelled inputs and 0 for the null class, on 2 channels, plus a variance part of 7."""

    num_classes = 5
    patchifier = Patchifier(2, 1, 2)

    def forward(self, x_t, t, y=None, masking=None):
        cond = (y != self.num_classes).float().view(-1, 1, 1) * torch.arange(1, 3).float().repeat(x_t.shape[1], 1).view(1, x_t.shape[1], 2)
        mean = cond.expand_as(x_t)
        return torch.cat([mean, torch.full_like(x_t, 7.0)], -1)


def test_cfg_formula_on_all_or_some_channels():
    schedule = NoiseSchedule("linear", 1000)
    x = torch.zeros(2, 4, 2)
    t = torch.tensor([10, 10])
    y = torch.tensor([1, 3])
    full = Denoiser(ConstantBackbone(), schedule, "x0", learn_sigma=True, guidance=ClassifierFreeGuidance(4.0))
    raw = full.raw(x, t, y)
    # uncond = 0, cond = [1, 2] per channel: guided = 0 + 4 * (cond - 0)
    torch.testing.assert_close(raw[..., :2], torch.tensor([4.0, 8.0]).expand(2, 4, 2))
    torch.testing.assert_close(raw[..., 2:], torch.full((2, 4, 2), 7.0))  # variance part from the conditional pass
    legacy = Denoiser(ConstantBackbone(), schedule, "x0", learn_sigma=True, guidance=ClassifierFreeGuidance(4.0, channels=1))
    torch.testing.assert_close(legacy.raw(x, t, y)[..., :2], torch.tensor([4.0, 2.0]).expand(2, 4, 2))


def test_power_cosine_schedule():
    guidance = ClassifierFreeGuidance(3.8, schedule="power_cosine", power=4.0)
    weights = guidance.weight(torch.tensor([0, 500, 999, 1000]), 1000)
    assert weights[0].item() == pytest.approx(3.8)
    assert weights[-1].item() == pytest.approx(1.0)
    expected = (3.8 - 1) * (1 - math.cos((0.5**4) * math.pi)) / 2 + 1
    assert weights[1].item() == pytest.approx(expected, rel=1e-6)
    assert weights[0] > weights[1] > weights[2]


def test_inpainting_keeps_known_tokens():
    schedule = NoiseSchedule("linear", 1000)
    targets = torch.zeros(1, 4, 4)
    denoiser = Denoiser(OracleBackbone(schedule, targets), schedule, "eps")
    known = torch.randn(2, 4, 4)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    out = DDIMSampler(20).sample(denoiser, (2, 4, 4), torch.tensor([0, 0]), torch.Generator().manual_seed(0), known=known, mask=mask)
    torch.testing.assert_close(out[~mask], known[~mask])
    with pytest.raises(ValueError, match="both"):
        DDIMSampler(5).sample(denoiser, (2, 4, 4), None, known=known)


@pytest.mark.parametrize(("sampler", "steps", "expected"), [
    (DDPMSampler(7), None, 7),
    (DDIMSampler(4, eta=1.0, spacing="big_vision"), None, 5),  # UMD's loop: steps + 1 calls, the last at t = 0
    (DDIMSampler(50), 3, 3),
    (FirstStepSampler(), 9, 1),
])
def test_num_steps_is_how_often_the_sampler_calls_back(sampler, steps, expected):
    schedule = NoiseSchedule("linear", 100)
    denoiser = Denoiser(OracleBackbone(schedule, torch.zeros(1, 4, 4)), schedule, "eps")
    calls = []
    sampler.sample(denoiser, (1, 4, 4), None, torch.Generator().manual_seed(0), steps=steps,
                   callback=lambda step, x, output: calls.append(step))
    assert sampler.num_steps(schedule, steps) == len(calls) == expected
