import math

import pytest
import torch

from maskdiff.corruption import Corrupted, GaussianNoise, random_masking
from maskdiff.diffusion import NoiseSchedule
from maskdiff.objectives import DiffusionLoss, MaskedReconstruction, min_snr_weight
from maskdiff.objectives.vlb import discretized_gaussian_log_likelihood, normal_kl, vlb_terms


def noised_view(batch=4, tokens=6, width=4, t=None):
    corruption = GaussianNoise("linear", 1000)
    clean = torch.randn(batch, tokens, width)
    t = t if t is not None else torch.tensor([0, 5, 500, 999])[:batch]
    return corruption.noised(clean, t)


def test_eps_mse_equals_formula_without_sigma():
    view = noised_view()
    prediction = torch.randn_like(view.clean)
    out = DiffusionLoss("eps", learn_sigma=False)(prediction, view)
    torch.testing.assert_close(out.loss, ((prediction - view.noise) ** 2).mean())


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_other_targets(kind):
    view = noised_view()
    prediction = torch.randn_like(view.clean)
    alpha, sigma = view.schedule.alpha_sigma(view.t, view.clean)
    target = view.clean if kind == "x0" else alpha * view.noise - sigma * view.clean
    out = DiffusionLoss(kind, learn_sigma=False)(prediction, view)
    torch.testing.assert_close(out.loss, ((prediction - target) ** 2).mean())


def test_hybrid_loss_adds_vlb_that_only_trains_variance():
    view = noised_view()
    mean = torch.randn_like(view.clean, requires_grad=True)
    variance = torch.zeros_like(view.clean, requires_grad=True)
    out = DiffusionLoss("eps", learn_sigma=True)(torch.cat([mean, variance], -1), view)
    expected_vlb = vlb_terms(mean.detach(), variance.detach(), view.clean, view.tokens, view.t, view.schedule).mean(dim=(1, 2))
    torch.testing.assert_close(out.parts["vlb"], expected_vlb.mean())
    torch.testing.assert_close(out.loss, out.parts["mse"] + out.parts["vlb"])
    out.loss.backward()
    mse_only = torch.autograd.grad(((mean - view.noise) ** 2).mean(), mean)[0]
    torch.testing.assert_close(mean.grad, mse_only)  # the VLB does not reach the mean
    assert variance.grad.abs().sum() > 0


def test_vlb_is_zero_for_the_true_posterior_mean_and_variance():
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.rand(2, 3, 4) * 2 - 1
    t = torch.tensor([10, 700])
    noise = torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, noise)
    # v = -1 gives log σ² = log β̃ (the true posterior variance); the true ε gives the true mean
    kl = vlb_terms(noise, -torch.ones_like(x0), x0, x_t, t, schedule)
    assert kl.abs().max() < 1e-4
    assert torch.allclose(normal_kl(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_discretized_likelihood_sums_to_one_over_bins():
    bins = torch.linspace(-1, 1, 256).view(-1, 1)
    log_p = discretized_gaussian_log_likelihood(bins, torch.zeros(1, 1), torch.full((1, 1), math.log(0.3)))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.5, 5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21], dtype=torch.float64))
    view = noised_view()
    prediction = torch.randn_like(view.clean)
    out = DiffusionLoss("eps", learn_sigma=False, weighting="min_snr")(prediction, view)
    weights = min_snr_weight(view.schedule.snr(view.t), 5.0, "eps").float()
    torch.testing.assert_close(out.loss, (weights * ((prediction - view.noise) ** 2).mean(dim=(1, 2))).mean())


def test_loss_regions_follow_the_mask():
    clean = torch.randn(2, 8, 3)
    masking = random_masking(2, 8, 0.75, generator=torch.Generator().manual_seed(0))
    view = Corrupted(tokens=clean, clean=clean, masking=masking)
    prediction = torch.randn_like(clean)
    per_token = ((prediction - clean) ** 2).mean(-1)
    hidden = masking.mask.float()
    masked = MaskedReconstruction(region="masked")(prediction, view).loss
    torch.testing.assert_close(masked, ((per_token * hidden).sum() / hidden.sum()))
    visible = MaskedReconstruction(region="visible")(prediction, view).loss
    torch.testing.assert_close(visible, ((per_token * (1 - hidden)).sum() / (1 - hidden).sum()))
    with pytest.raises(ValueError, match="needs a masking corruption"):
        MaskedReconstruction(region="masked")(prediction, Corrupted(tokens=clean, clean=clean))


def test_norm_pix_target():
    clean = torch.randn(1, 4, 6) * 3 + 2
    view = Corrupted(tokens=clean, clean=clean, masking=random_masking(1, 4, 0.5))
    target = (clean - clean.mean(-1, keepdim=True)) / (clean.var(-1, keepdim=True) + 1e-6).sqrt()
    loss = MaskedReconstruction(norm_pix=True, region="all")(target, view).loss
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_width_mismatch_is_reported():
    view = noised_view()
    with pytest.raises(ValueError, match="width 2 x 4, got 4"):
        DiffusionLoss("eps", learn_sigma=True)(torch.randn_like(view.clean), view)
