"""Run by tests/scale/test_fsdp.py in a subprocess (Lightning launches the second rank by re-running this file):
two CPU ranks under BackboneFSDPStrategy with FULL_SHARD, EMA decay 0 (so the EMA must equal the live weights),
clipping by norm, then a sharded checkpoint in ``sys.argv[1]``. Prints the weight-decay groups and, every step,
each rank's share of the backbone and whether its EMA shards line up with its live shards."""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from maskdiff.backbones import create_backbone
from maskdiff.methods import DiT
from maskdiff.scale import BackboneFSDPStrategy


class ReportShards(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        sizes = [len(group["params"]) for group in trainer.optimizers[0].param_groups]
        print(f"rank {trainer.global_rank} weight decay groups {sizes}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        live, ema = list(pl_module.backbone.parameters()), list(pl_module.ema_backbone.parameters())
        aligned = all(a.shape == b.shape for a, b in zip(live, ema))
        print(f"rank {trainer.global_rank} step {trainer.global_step} local {sum(p.numel() for p in live)} aligned {aligned}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    module = DiT(create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10), ema_decay=0.0)
    loader = DataLoader(TensorDataset(torch.rand(48, 1, 8, 8) * 2 - 1, torch.arange(48) % 10), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=3, gradient_clip_val=0.5, logger=False,
                        strategy=BackboneFSDPStrategy(activation_checkpointing=True, state_dict_type="sharded"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ReportShards()], default_root_dir=sys.argv[1])
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(f"{sys.argv[1]}/sharded")
