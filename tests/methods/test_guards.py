"""The non-finite guard (stop / skip) and step-keyed randomness of :mod:`maskdiff.methods.guards`."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import load_method, write_method_checkpoint
from maskdiff.methods.guards import step_seed
from maskdiff.objectives.base import ObjectiveOutput
from maskdiff.tools.sample import sample

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_method(**kwargs) -> DiT:
    backbone = DiTBackbone(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=0)
    return DiT(backbone, ema_decay=0.9, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), **kwargs)


def loader() -> DataLoader:
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorDataset(images), batch_size=8)


class PoisonLoss(L.Callback):
    """Make the training loss NaN at the given (1-based) optimizer steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}
        self.weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        original = type(module).step_loss
        if step in self.steps:
            def poisoned(images, labels):
                output = original(module, images, labels)
                return ObjectiveOutput(loss=output.loss * float("nan"), parts=output.parts)

            module.step_loss = poisoned
            self.weights_before[step] = {k: v.clone() for k, v in module.backbone.state_dict().items()}
        elif "step_loss" in module.__dict__:
            del module.step_loss

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self.weights_after[trainer.global_step] = {k: v.clone() for k, v in module.backbone.state_dict().items()}


def trainer(tmp_path, max_steps: int, *callbacks) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[checkpoints, *callbacks], default_root_dir=tmp_path)


def test_nonfinite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan in optimizer step 5 \(global_step 4, epoch 0\); .*no checkpoint holds it"):
        trainer(tmp_path, 8, PoisonLoss({5})).fit(tiny_method(), loader())
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4  # the four good steps; step 5 never reached the optimizer
    assert not (tmp_path / "epoch=0-step=5.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_skip_leaves_weights_and_optimizer_untouched_then_trains_on(tmp_path):
    poison = PoisonLoss({3})
    method = tiny_method(on_nonfinite="skip")
    trainer(tmp_path, 6, poison).fit(method, loader())
    assert method.skipped_steps == 1 and method.global_step == 6
    before, after = poison.weights_before[3], poison.weights_after[3]
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    # AdamW stepped 5 times, not 6: the skipped step left its step counts and moments alone
    steps = {int(state["step"]) for state in last["optimizer_states"][0]["state"].values()}
    assert steps == {5}


def test_skip_gives_up_after_max_skipped_steps_in_a_row(tmp_path):
    with pytest.raises(FloatingPointError, match=r"3 steps in a row were skipped \(max_skipped_steps 2\)"):
        trainer(tmp_path, 8, PoisonLoss({2, 3, 4, 5})).fit(tiny_method(on_nonfinite="skip", max_skipped_steps=2), loader())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be 'stop' or 'skip', got 'ignore'"),
    ({"max_skipped_steps": 0}, "max_skipped_steps must be at least 1, got 0"),
])
def test_bad_guard_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_method(**kwargs)


def test_step_seeds_differ_by_step_rank_and_run_and_repeat():
    seeds = {step_seed(run, rank, step) for run in (0, 1) for rank in (0, 1, 2) for step in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert step_seed(7, 1, 123) == step_seed(7, 1, 123)
    assert all(0 <= seed < 2**63 for seed in seeds)


class SpikeLearningRate(L.Callback):
    """Set every learning rate to infinity at the given (1-based) optimizer steps: finite gradients, non-finite
    weights after the step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.saved_lr: list[float] = []
        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}
        self.weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        if self.saved_lr:
            for group, lr in zip(optimizer.param_groups, self.saved_lr):
                group["lr"] = lr
            self.saved_lr = []
        step = trainer.global_step + 1
        if step in self.steps:
            self.saved_lr = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = float("inf")
            self.weights_before[step] = {k: v.clone() for k, v in module.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self.weights_after[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}


def test_nonfinite_weights_after_a_step_stop_the_run_before_anything_is_saved(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite weight backbone\.\S+ after optimizer step 4 .*before anything was saved"):
        trainer(tmp_path, 8, SpikeLearningRate({4})).fit(tiny_method(), loader())
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert not (tmp_path / "epoch=0-step=4.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_skip_rolls_nonfinite_weights_back_and_trains_on(tmp_path):
    spike = SpikeLearningRate({3})
    method = tiny_method(on_nonfinite="skip")
    trainer(tmp_path, 6, spike).fit(method, loader())
    assert method.skipped_steps == 1 and method.global_step == 6
    before, after = spike.weights_before[3], spike.weights_after[3]
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert [state["step"].item() for state in last["optimizer_states"][0]["state"].values()][0] == 5


def test_commands_refuse_a_checkpoint_with_nonfinite_weights(tmp_path):
    source = Path(__file__).resolve().parents[1] / "fixtures" / "legacy" / "dit.ckpt"
    checkpoint = torch.load(source, weights_only=True)
    name = next(key for key in checkpoint["state_dict"] if key.startswith("ema_backbone.") and key.endswith("weight"))
    checkpoint["state_dict"][name][0] = float("nan")
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(checkpoint, poisoned)
    with pytest.raises(ValueError, match=rf"{poisoned} holds non-finite weights \(first: {re.escape(name)}\)"):
        load_method(poisoned)
    with pytest.raises(ValueError, match="holds non-finite weights"):
        sample(str(poisoned), out=str(tmp_path / "grid.png"))
    assert not (tmp_path / "grid.png").exists()


def test_micro_batches_of_one_step_draw_fresh_randomness_under_accumulation(tmp_path):
    method = tiny_method()
    drawn = []
    corruption_forward = method.corruption.forward

    def recording(clean, grid):
        views = corruption_forward(clean, grid)
        drawn.append((method.global_step, views[0].t.clone(), views[0].noise.clone()))
        return views

    method.corruption.forward = recording
    L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=4, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(method, loader())
    assert [step for step, _, _ in drawn] == [0, 0, 0, 0, 1, 1, 1, 1]
    for first in range(len(drawn)):
        for second in range(first + 1, len(drawn)):
            assert not torch.equal(drawn[first][2], drawn[second][2]), (first, second)


def test_step_seeds_differ_by_micro_batch_and_rank_and_keep_plain_steps_unchanged():
    seeds = {(rank, micro): step_seed(0, rank, 5, micro) for rank in range(2) for micro in range(4)}
    assert len(set(seeds.values())) == 8
    assert step_seed(0, 1, 5) == step_seed(0, 1, 5, 0)


def test_an_empty_evaluation_batch_is_not_logged_as_a_nan_loss(tmp_path):
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = DataLoader([(images,), (images[:0],)], batch_size=None)
    results = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path).validate(tiny_method(), batches, verbose=False)
    assert torch.isfinite(torch.tensor(results[0]["val/loss"]))


def test_nonfinite_weights_are_never_written_as_a_method_checkpoint(tmp_path):
    state = tiny_method().state_dict()
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("inf"))
    target = tmp_path / "converted.ckpt"
    with pytest.raises(ValueError, match=rf"refusing to write {target}: the weights hold a NaN or infinity \(first: {re.escape(name)}\)"):
        write_method_checkpoint(target, "maskdiff.methods.DiT", {}, state)
    assert list(tmp_path.iterdir()) == []
