"""Declared contracts: incompatible compositions are refused when the method is built, in one line naming both parts."""

from __future__ import annotations

import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import MAE as MAEBackbone
from maskdiff.backbones import MDT as MDTBackbone
from maskdiff.backbones import create_backbone
from maskdiff.corruption import BlockMasker, GaussianNoise, MaskedNoise, MaskedPatchNoise, TokenMasking
from maskdiff.corruption.base import Corrupted
from maskdiff.diffusion import Parameterization
from maskdiff.methods import MAE, MDT, DiffMAE, DiT, MaskDiffModule
from maskdiff.methods.contracts import CompositionError
from maskdiff.objectives import DiffusionLoss, MaskedReconstruction, Objective, ObjectiveOutput
from maskdiff.samplers import DDIMSampler, DDPMSampler


def dit_backbone(**extra):
    return DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, **extra)


def mdt_backbone(learn_sigma: bool = True):
    return MDTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, decode_layer=1,
                       num_classes=10, learn_sigma=learn_sigma)


class VelocityLoss(Objective):
    """A v-prediction objective written from scratch, declaring its parameterization."""

    needs_noise = True
    parameterization = Parameterization("v")

    def forward(self, prediction, view: Corrupted) -> ObjectiveOutput:
        alpha, sigma = view.schedule.alpha_sigma(view.t, view.clean)
        target = alpha * view.noise - sigma * view.clean
        return ObjectiveOutput(loss=((prediction - target) ** 2).mean())


class UndeclaredLoss(VelocityLoss):
    """The same objective without a parameterization: it trains, but cannot be read for sampling."""

    parameterization = None


def assert_one_line(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


def test_dit_backbone_with_masked_noise_is_refused():
    with pytest.raises(CompositionError) as error:
        MDT(backbone=dit_backbone(num_classes=10), corruption=MaskedNoise(0.3), ema_decay=None)
    assert_one_line(error, "MaskedNoise", "DiT", "cannot mask")


def test_mae_backbone_with_gaussian_noise_is_refused():
    backbone = create_backbone("mae_nano")
    with pytest.raises(CompositionError) as error:
        MAE(backbone=backbone, corruption=GaussianNoise(), objective=MaskedReconstruction(region="all"))
    assert_one_line(error, "GaussianNoise", "backbone MAE", "takes no timesteps")


def test_mdt_backbone_with_masked_patch_noise_is_refused():
    with pytest.raises(CompositionError) as error:
        MDT(backbone=mdt_backbone(), corruption=MaskedPatchNoise(0.5), ema_decay=None)
    assert_one_line(error, "MaskedPatchNoise", "backbone MDT", "mask token", "denoises the noised values")


def test_an_objective_without_parameterization_cannot_be_sampled():
    with pytest.raises(CompositionError) as error:
        DiT(backbone=dit_backbone(learn_sigma=False), objective=UndeclaredLoss(), ema_decay=None)
    assert_one_line(error, "UndeclaredLoss", "DDPMSampler", "no parameterization")
    # Without a sampler it trains (and says why it cannot generate when asked).
    method = MaskDiffModule(backbone=dit_backbone(learn_sigma=False), corruption=GaussianNoise(), objective=UndeclaredLoss(),
                            ema_decay=None)
    assert method.inpainting is None
    with pytest.raises(ValueError, match="UndeclaredLoss declares no parameterization"):
        method.generate(num=1)


def test_a_masker_on_a_backbone_that_cannot_mask_is_refused():
    with pytest.raises(CompositionError) as error:
        MaskDiffModule(backbone=dit_backbone(learn_sigma=False), corruption=TokenMasking(0.5, masker=BlockMasker()),
                       objective=MaskedReconstruction(), ema_decay=None)
    assert_one_line(error, "TokenMasking", "BlockMasker", "backbone DiT", "cannot mask")


def test_timestep_backbone_with_a_noise_free_corruption_is_refused():
    with pytest.raises(CompositionError) as error:
        MaskDiffModule(backbone=mdt_backbone(learn_sigma=False), corruption=TokenMasking(0.5), objective=MaskedReconstruction(),
                       ema_decay=None)
    assert_one_line(error, "backbone MDT", "TokenMasking", "timesteps")


def test_hidden_chain_inpainting_needs_a_backbone_that_denoises_hidden_tokens():
    with pytest.raises(CompositionError) as error:
        DiT(backbone=dit_backbone(), inpainting="hidden_chain", ema_decay=None)
    assert_one_line(error, "hidden_chain", "backbone DiT")
    with pytest.raises(CompositionError, match="reconstruct inpainting"):
        DiT(backbone=dit_backbone(), inpainting="reconstruct", ema_decay=None)


def test_learned_variance_mismatch_names_both_parts():
    with pytest.raises(CompositionError) as error:
        DiT(backbone=dit_backbone(learn_sigma=True), objective=DiffusionLoss(learn_sigma=False), ema_decay=None)
    assert_one_line(error, "objective DiffusionLoss", "backbone DiT", "learn_sigma")


def test_a_declared_v_objective_trains_and_generates():
    torch.manual_seed(0)
    method = DiT(backbone=dit_backbone(learn_sigma=False, num_classes=10), objective=VelocityLoss(),
                 sampler=DDIMSampler(3), ema_decay=None, clip_x0=1.0)
    images, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)
    method.step_loss(images, labels).loss.backward()
    samples = method.generate(labels[:2], generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()
    assert method.denoiser().prediction == "v"


def test_methods_declare_their_inpainting():
    assert DiT(backbone=dit_backbone(), ema_decay=None).inpainting == "repaint"
    assert MAE(backbone=create_backbone("mae_nano")).inpainting == "reconstruct"
    assert DiffMAE(backbone=create_backbone("diffmae_nano")).inpainting == "hidden_chain"
