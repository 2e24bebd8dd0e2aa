"""What the trainer configs assume of every method: DDP without unused-parameter detection, and bf16 autocast."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from maskdiff.corruption import UnifiedMaskedNoise
from tests.scale.test_compile import tiny

METHODS = ["dit", "mdt", "mdtv2", "mae", "diffmae", "umd"]


def unused_parameters(module) -> set[str]:
    images, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    module.step_loss(images, labels).loss.backward()
    return {name for name, param in module.named_parameters() if param.requires_grad and param.grad is None}


# DiffMAE's cross / cross-self decoders read every encoder block, never the encoder's final norm (used only by
# forward_features): under DDP it needs find_unused_parameters true, or that norm frozen in pre-training.
UNUSED = {"diffmae": {"backbone.norm.weight", "backbone.norm.bias"}}


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient_each_step(method):
    """configs/trainer/ddp.yaml sets find_unused_parameters false: DDP fails on the second step if one did not."""
    assert unused_parameters(tiny(method)) == UNUSED.get(method, set())


def test_umd_dit_like_baseline_leaves_the_mask_token_unused():
    """The exception named in configs/trainer/ddp.yaml: no masking at all, so find_unused_parameters must be true."""
    module = tiny("umd")
    module.corruption = UnifiedMaskedNoise(no_noise_prob=0.0, mask_ratio=0.0)
    assert unused_parameters(module) == {"backbone.mask_token"}


@pytest.mark.parametrize("method", ["dit", "mae", *(pytest.param(m, marks=pytest.mark.slow) for m in ("mdt", "mdtv2", "diffmae", "umd"))])
def test_bf16_mixed_training_runs_on_cpu_and_keeps_float32_weights(method, one_thread):
    module = tiny(method)
    loader = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10), batch_size=8)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"])

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=loader)
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    assert {p.dtype for p in module.parameters()} == {torch.float32}  # autocast only: weights, optimizer and EMA stay fp32
    generative = getattr(module.corruption, "schedule", None) is not None and method != "diffmae"
    if generative:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            labels = torch.tensor([0, 1]) if module.conditional else None
            images = module.generate(labels, num=2, steps=2, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(images).all()
