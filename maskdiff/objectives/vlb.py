"""The variational bound term that trains DiT's learned variance (ADM's ``_vb_terms_bpd``), in bits per dim."""

from __future__ import annotations

import math

import torch

from maskdiff.diffusion.parameterization import Prediction, to_x0
from maskdiff.diffusion.schedules import NoiseSchedule


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2))."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` in [-1, 1] (255 bins of width 2/255) under a discretised Gaussian, elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vlb_terms(
    mean_output: torch.Tensor,
    variance_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
) -> torch.Tensor:
    """Elementwise L_vlb in bits: KL(q(x_{t-1}|x_t,x0) ‖ p_θ) for t>0, the decoder NLL at t=0; ``(B, ...)``.

    Pass ``mean_output`` detached to reproduce DiT's hybrid loss (the VLB then trains only the variance).
    """
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    x0_hat = to_x0(mean_output, x_t, alpha, sigma, prediction)
    model_mean, _ = schedule.q_posterior(x0_hat, x_t, t)
    model_log_variance = schedule.learned_log_variance(variance_output, t)
    true_mean, true_log_variance = schedule.q_posterior(x0, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance) / math.log(2.0)
    first_step = (t == 0).view(-1, *([1] * (x_t.ndim - 1)))
    return torch.where(first_step, decoder_nll, kl)
