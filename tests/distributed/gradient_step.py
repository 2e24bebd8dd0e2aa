"""One training step of a small method through Lightning, saving the gradients the optimizer would apply.

Run as one process (``run(method, world_size=1, ...)``) on the global batch, or as one rank of a DDP group launched
the way ``torchrun`` launches (``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, Lightning then creates no
processes itself) on its share of the rows:

    python -m tests.distributed.gradient_step OUT_DIR dit mae mdt

Rank ``r`` of ``W`` trains on rows ``[r*B/W, (r+1)*B/W)`` of one fixed global batch of ``B`` images, and its
corruption is :class:`RowShardedCorruption`: the noise, timesteps and masks of the whole global batch drawn from one
seed, of which the rank keeps its rows. So every row sees the same randomness in both runs, and DDP's averaged
gradient must equal the one-process gradient of the mean loss over ``B`` rows.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from maskdiff.backbones import MAE as MAEBackbone
from maskdiff.backbones import MDT as MDTBackbone
from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.corruption.base import Corrupted, Corruption
from maskdiff.methods import MAE, MDT, DiT

GLOBAL_BATCH = 8
CORRUPTION_SEED = 1234


class RowShardedCorruption(Corruption):
    """Corrupt the whole global batch ``(B, N, P)`` from one seed and keep this rank's ``rows`` of every view.

    The other ranks' rows are zeros here; they only shape the draws (noise, ``t`` and masks do not depend on the
    clean tokens), and are dropped before the backbone runs.
    """

    def __init__(self, inner: Corruption, global_batch: int, seed: int) -> None:
        super().__init__()
        self.inner = inner
        self.schedule = getattr(inner, "schedule", None)
        self.global_batch = global_batch
        self.seed = seed
        self.rows = slice(0, global_batch)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        full = clean.new_zeros((self.global_batch, *clean.shape[1:]))
        full[self.rows] = clean
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            views = self.inner(full, grid)
        return [self._take_rows(view) for view in views]

    def _take_rows(self, view: Corrupted) -> Corrupted:
        if view.rows != slice(None):
            raise ValueError(f"{type(self.inner).__name__} splits the batch into rows {view.rows}; not supported here")
        rows = self.rows

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows]

        return dataclasses.replace(
            view, tokens=view.tokens[rows], clean=view.clean[rows], t=pick(view.t), model_t=pick(view.model_t),
            noise=pick(view.noise), masking=None if view.masking is None else view.masking.select(rows),
        )


def build(method: str) -> L.LightningModule:
    """A small method on 8x8 one-channel images, with every parameter perturbed away from its zero init, so that
    every gradient is non-zero at the first step (DiT's adaLN-Zero would otherwise zero most of them)."""
    L.seed_everything(0)
    size = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2}
    if method == "dit":
        module = DiT(DiTBackbone(**size, num_classes=10, class_dropout_prob=0.0), ema_decay=None)
    elif method == "mdt":
        module = MDT(MDTBackbone(**size, num_classes=10, class_dropout_prob=0.0, decode_layer=1), ema_decay=None)
    elif method == "mae":
        module = MAE(MAEBackbone(**size, decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2))
    else:
        raise ValueError(f"unknown method {method!r}; expected dit, mdt or mae")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    module.corruption = RowShardedCorruption(module.corruption, GLOBAL_BATCH, CORRUPTION_SEED)
    return module


class RankRows(L.LightningDataModule):
    """This rank's rows of one fixed global batch of images in [-1, 1] ``(B, 1, 8, 8)`` with labels ``(B,)``."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.images = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=generator) * 2 - 1
        self.labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)

    def rows(self) -> slice:
        per_rank = GLOBAL_BATCH // self.trainer.world_size
        return slice(self.trainer.global_rank * per_rank, (self.trainer.global_rank + 1) * per_rank)

    def train_dataloader(self) -> DataLoader:
        rows = self.rows()
        self.trainer.lightning_module.corruption.rows = rows
        dataset = TensorDataset(self.images[rows], self.labels[rows])
        return DataLoader(dataset, batch_size=rows.stop - rows.start, shuffle=False)


class SaveGradients(L.Callback):
    """Save ``{name: grad}`` on rank 0 right before the first optimizer step (after DDP's all-reduce)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == 0:
            grads = {name: p.grad.detach().clone() for name, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "world_size": trainer.world_size}, self.path)


def run(method: str, devices: int, out_dir: Path) -> Path:
    """Fit one step of ``method`` on ``devices`` CPU processes; returns the saved gradients' path."""
    path = Path(out_dir) / f"{method}-grads-{devices}.pt"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[SaveGradients(path)],
    )
    trainer.fit(build(method), datamodule=RankRows())
    return path


if __name__ == "__main__":
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])  # Lightning's teardown removes it from the environment
    for name in sys.argv[2:]:
        run(name, world_size, Path(sys.argv[1]))
    # Both ranks leave together: a rank that exits while the other still holds gloo connections can abort it
    # ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
