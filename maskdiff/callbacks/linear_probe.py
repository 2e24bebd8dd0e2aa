"""Online linear probe: a linear head trained on detached features of the training batches while a method trains."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from maskdiff.backbones.features import FeatureSpec, backbone_features, resolve_spec
from maskdiff.evaluation.features import method_schedule
from maskdiff.evaluation.linear_probe import linear_head
from maskdiff.modes import evaluating


class OnlineLinearProbe(L.Callback):
    """Trains ``BatchNorm1d(affine=False) + Linear`` on the live backbone's features and logs held-out accuracy.

    Every ``every_n_steps``-th training batch, the callback runs its own forward of the live (raw) backbone in eval
    mode under ``torch.no_grad()`` and a forked RNG on the batch's clean, unmasked inputs (``batch_tokens``; images
    or video clips; for MAE and DiffMAE the encoder alone, no decoder and no noise; the same
    :class:`~maskdiff.evaluation.FeatureSpec` as ``maskdiff probe``), then steps its head with its own SGD
    (momentum 0.9). The method's gradients, optimizer state, EMA and random stream are left as they were; the head
    lives outside the LightningModule (not in its state dict, EMA or DDP wrapper). Under DDP the head's gradients and
    BatchNorm statistics are averaged over ranks so all ranks keep the same head.

    On each validation epoch it logs ``probe/top1`` and ``probe/top5`` (torchmetrics, synced over ranks);
    ``probe/train_loss`` is logged per training step. The protocol (``mode: online``, pooling, depth, timestep, lr)
    is logged once as hyperparameters ``online_probe``. Online numbers are not comparable with the offline
    ``maskdiff probe`` ones: the head chases a moving backbone and sees each batch once per epoch.

    Args:
        pooling: ``cls``, ``mean`` or ``prefix_mean``; default: the backbone's ``default_pooling`` (UMD: the mean of its
            registers), else ``cls`` when it has a cls token, else ``mean``.
        depth: encoder blocks to run (0..num_blocks, no final norm); default all blocks + final norm.
        timestep: timestep of a time-conditioned backbone (default 0, or ``noise_t`` + the method's time offset);
            must be unset for MAE.
        noise_t: probe noised inputs, as UMD's paper probes its DiT-like and MaskDiT-like baselines (50): the clean
            tokens are noised to this step of the method's schedule (``FeatureSpec.noise_t``; UMD's backbone then
            sees t = 51); ``None``: clean inputs.
        noise_seed: seeds that noise, per training step and rank (each validation batch gets the same noise every
            epoch).
        lr: the head's SGD learning rate (constant).
        num_classes: classes of the head; default the data module's ``num_classes``.
        every_n_steps: train the head on every n-th training batch.
        seed: seeds the head's initialisation.
    """

    def __init__(
        self,
        pooling: Literal["cls", "mean", "prefix_mean"] | None = None,
        depth: int | None = None,
        timestep: int | None = None,
        lr: float = 0.1,
        num_classes: int | None = None,
        every_n_steps: int = 1,
        seed: int = 0,
        noise_t: int | None = None,
        noise_seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.pooling = pooling
        self.depth = depth
        self.timestep = timestep
        self.lr = lr
        self.num_classes = num_classes
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.noise_t = noise_t
        self.noise_seed = noise_seed
        self.spec: FeatureSpec | None = None
        self.head: torch.nn.Sequential | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.top1: MulticlassAccuracy | None = None
        self.top5: MulticlassAccuracy | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        if self.noise_t is None:
            return self._generate_state_key(pooling=self.pooling, depth=self.depth, timestep=self.timestep)
        return self._generate_state_key(pooling=self.pooling, depth=self.depth, timestep=self.timestep, noise_t=self.noise_t)

    def protocol(self) -> dict[str, Any]:
        spec = self.spec.as_dict() if self.spec is not None else {}
        return {"mode": "online", **spec, "head": "BatchNorm1d(affine=False)+Linear", "optimizer": "sgd",
                "momentum": 0.9, "lr": self.lr, "num_classes": self.num_classes, "every_n_steps": self.every_n_steps}

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "backbone") or not hasattr(pl_module, "batch_tokens"):
            raise TypeError(f"OnlineLinearProbe needs a maskdiff method (backbone + batch_tokens), got {type(pl_module).__name__}")
        if self.num_classes is None:
            self.num_classes = getattr(trainer.datamodule, "num_classes", None) if trainer.datamodule is not None else None
            if self.num_classes is None:
                raise ValueError("OnlineLinearProbe: the data module has no num_classes; set num_classes on the callback")
        backbone = pl_module.backbone
        pooling = self.pooling or backbone.default_pooling
        spec = FeatureSpec(pooling=pooling, depth=self.depth, timestep=self.timestep, use_ema=False, noise_t=self.noise_t,
                           noise_seed=self.noise_seed)
        self.spec = resolve_spec(backbone, spec, method_schedule(pl_module)[1])
        top5 = min(5, self.num_classes)
        self.top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        protocol = self.protocol()
        for logger in trainer.loggers:
            logger.log_hyperparams({"online_probe": protocol})
        rank_zero_info("online linear probe: " + ", ".join(f"{k}={v}" for k, v in protocol.items()))

    def _ensure_head(self, feature_dim: int, device: torch.device) -> torch.nn.Sequential:
        if self.head is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.head = linear_head(feature_dim, self.num_classes, generator).to(device)
            self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=0.9)
            if self._pending_state is not None:
                self._apply_state(self._pending_state)
                self._pending_state = None
        self.top1.to(device)
        self.top5.to(device)
        return self.head

    # ------------------------------------------------------------------------------------------ features
    def noise_generator(self, trainer: L.Trainer, *key: int) -> torch.Generator | None:
        """The generator of a ``noise_t`` probe's noise, seeded from ``noise_seed``, the rank and ``key``."""
        if self.noise_t is None:
            return None
        return torch.Generator().manual_seed(hash((self.noise_seed, trainer.global_rank, *key)) % 2**63)

    def features(
        self, trainer: L.Trainer, pl_module: L.LightningModule, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Detached float32 features ``(B, D)`` of ``images (B, C, H, W)`` or clips ``(B, C, T, H, W)`` (video
        backbones: pooled over space and time) from the live backbone in eval mode; ``generator`` draws the noise of
        a ``noise_t`` probe."""
        backbone = pl_module.backbone
        schedule = method_schedule(pl_module)[0]
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context(), \
                evaluating(backbone):
            return backbone_features(backbone, pl_module.batch_tokens(images), self.spec, schedule, generator).float()

    @staticmethod
    def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("OnlineLinearProbe needs (images, labels) batches; this data gives no labels")
        return batch[0], batch[1].long()

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.world_size <= 1:
            return
        for param in self.head.parameters():
            if param.grad is not None:
                param.grad = trainer.strategy.reduce(param.grad, reduce_op="mean")

    def _sync_statistics(self, trainer: L.Trainer) -> None:
        if trainer.world_size <= 1:
            return
        norm = self.head[0]
        norm.running_mean.copy_(trainer.strategy.reduce(norm.running_mean, reduce_op="mean"))
        norm.running_var.copy_(trainer.strategy.reduce(norm.running_var, reduce_op="mean"))

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx % self.every_n_steps:
            return
        images, labels = self._split(batch)
        if images.shape[0] < 2:
            return
        features = self.features(trainer, pl_module, images, self.noise_generator(trainer, 0, trainer.global_step, batch_idx))
        head = self._ensure_head(features.shape[1], features.device)
        head.train()
        with torch.enable_grad():
            loss = F.cross_entropy(head(features), labels.to(features.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._sync(trainer)
        self.optimizer.step()
        with torch.no_grad():
            self._sync_statistics(trainer)
        pl_module.log("probe/train_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=images.shape[0])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or self.head is None:
            return
        images, labels = self._split(batch)
        if images.shape[0] == 0:
            return
        features = self.features(trainer, pl_module, images, self.noise_generator(trainer, 1, dataloader_idx, batch_idx))
        self.head.eval()
        with torch.no_grad():
            logits = self.head(features)
        labels = labels.to(logits.device)
        self.top1.update(logits, labels)
        self.top5.update(logits, labels)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.head is None:
            return
        pl_module.log("probe/top1", self.top1.compute(), sync_dist=True)
        pl_module.log("probe/top5", self.top5.compute(), sync_dist=True)
        self.top1.reset()
        self.top5.reset()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return dict(self._pending_state or {})
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "protocol": self.protocol()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.head is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
