"""Checkpoints written before the architecture change (tests/fixtures/legacy, see make.py there) still load and compute
what the code of that time computed from them: samples, inpaintings, reconstructions, losses and fine-tune logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskdiff.methods.checkpoints import load_method
from maskdiff.methods import FineTune
from maskdiff.samplers import DDIMSampler

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
EXPECTED = torch.load(LEGACY / "expected.pt", weights_only=True)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(2, 1, 16, 16, generator=seeded()) * 2 - 1
    pixel_mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    pixel_mask[..., :, :8] = True
    return images, pixel_mask


@pytest.mark.parametrize("name", ["dit", "mdt", "umd", "diffmae", "mae"])
def test_legacy_method_checkpoint_computes_as_before(name):
    module = load_method(LEGACY / f"{name}.ckpt").eval()
    expected = EXPECTED[name]
    images, pixel_mask = inputs()
    if name == "mae":
        torch.testing.assert_close(module.reconstruct(images, generator=seeded())[0], expected["reconstruct"])
        torch.testing.assert_close(module.inpaint(images, pixel_mask), expected["inpaint"])
    else:
        labels = torch.tensor([3, 7]) if module.conditional else None
        generated = module.generate(labels, num=2, sampler=DDIMSampler(4), generator=seeded())
        torch.testing.assert_close(generated, expected["generate"])
        inpainted = module.inpaint(images, pixel_mask, labels=labels, sampler=DDIMSampler(4), generator=seeded())
        torch.testing.assert_close(inpainted, expected["inpaint"])
    torch.manual_seed(0)
    torch.testing.assert_close(module.step_loss(images, torch.tensor([3, 7])).loss, expected["loss"])


def test_legacy_finetune_checkpoint_gives_the_same_logits():
    path = LEGACY / "finetune.ckpt"
    finetune = FineTune.load_from_checkpoint(path, weights_only=True, ckpt=str(LEGACY / "mae.ckpt")).eval()
    finetune.configure_model()
    finetune.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    images, _ = inputs()
    torch.testing.assert_close(finetune(images), EXPECTED["finetune"]["logits"])
