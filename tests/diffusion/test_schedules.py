import math

import numpy as np
import pytest
import torch

from maskdiff.diffusion import NoiseSchedule, space_timesteps
from maskdiff.diffusion.parameterization import target_for, to_eps, to_v, to_x0


def test_linear_schedule_matches_formula():
    schedule = NoiseSchedule("linear", 1000)
    expected = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(schedule.betas.numpy(), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-12)
    # T=500 is rescaled so the chain covers the same range
    assert NoiseSchedule("linear", 500).betas[-1].item() == pytest.approx(0.04)


def test_cosine_schedule_matches_formula():
    schedule = NoiseSchedule("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 998, 999):
        assert schedule.betas[i].item() == pytest.approx(min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999), rel=1e-12)
    assert schedule.betas.max().item() <= 0.999


def test_rho_schedule_is_linear_to_the_rho():
    schedule = NoiseSchedule("rho_linear", 1000, rho=0.8)
    np.testing.assert_allclose(schedule.betas.numpy(), np.linspace(1e-4, 0.02, 1000) ** 0.8, rtol=1e-12)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="'sigmoid'"):
        NoiseSchedule("sigmoid")


def test_respacing_matches_official_rules():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    stride = 999 / 249
    assert kept == sorted({round(i * stride) for i in range(250)})
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "10,10") == sorted(
        {round(i * 499 / 9) for i in range(10)} | {500 + round(i * 499 / 9) for i in range(10)}
    )
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_respaced_schedule_keeps_alpha_bar_at_kept_steps():
    schedule = NoiseSchedule("linear", 1000)
    respaced = schedule.respace(50)
    kept = torch.tensor(space_timesteps(1000, 50))
    assert torch.equal(respaced.timestep_map, kept)
    torch.testing.assert_close(respaced.alphas_cumprod, schedule.alphas_cumprod[kept], rtol=1e-12, atol=0)


def test_a_schedule_moved_to_another_device_respaces_there():
    """A method moved to a GPU moves its schedule's tables (buffers); respacing them for sampling stays on that device
    (the meta device stands in for a GPU here)."""
    respaced = NoiseSchedule("linear", 100).to("meta").respace(10)
    assert respaced.alphas_cumprod_prev.device.type == "meta" and respaced.num_steps == 10


def test_q_sample_closed_form():
    schedule = NoiseSchedule("linear", 1000)
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = torch.tensor([0, 500, 999])
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float().view(3, 1, 1)
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_posterior_equals_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from Bayes' rule on q(x_{t-1}|x0) and q(x_t|x_{t-1})."""
    schedule = NoiseSchedule("cosine", 1000)
    x0, x_t = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 400, 999])
    beta = schedule.betas[t].view(-1, 1, 1)
    abar_prev = schedule.alphas_cumprod[t - 1].view(-1, 1, 1)
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    variance = 1 / precision
    mean = variance * (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * x_t / beta)
    got_mean, got_log_var = schedule.q_posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_log_var.exp().expand_as(variance), variance, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_parameterization_round_trips(kind):
    schedule = NoiseSchedule("linear", 1000)
    x0, eps = torch.randn(6, 8, 4, dtype=torch.float64), torch.randn(6, 8, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x_t = alpha * x0 + sigma * eps
    output = target_for(kind, x0, eps, alpha, sigma)
    torch.testing.assert_close(to_x0(output, x_t, alpha, sigma, kind), x0)
    torch.testing.assert_close(to_eps(output, x_t, alpha, sigma, kind), eps)
    torch.testing.assert_close(to_v(x0, eps, alpha, sigma), alpha * eps - sigma * x0)
