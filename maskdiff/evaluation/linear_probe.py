"""Offline linear probe, MAE's protocol (``main_linprobe.py``) on cached frozen features.

:func:`run_linear_probe` trains ``BatchNorm1d(affine=False, eps=1e-6) + Linear`` (weights trunc-normal, std 0.01)
with LARS (momentum 0.9, trust 0.001) or SGD, lr = ``base_lr × batch / 256``, per-iteration linear warmup then
half-cycle cosine to 0, and reports top-1 / top-5 on the held-out features.

``maskdiff probe`` (:mod:`maskdiff.tools.probe`) extracts features of a checkpoint once for the training split
(every training sample once, without augmentation, :func:`train_split_batches`) and the held-out split, caches them
(:func:`feature_cache_path`), trains the head and writes JSON.

Differences from MAE's probe: features are computed once from un-augmented images (MAE recomputes them each epoch
under RandomResizedCrop + flip), so the head sees each training image in one view only.

The defaults are MAE's ImageNet protocol. LARS turns each step of the weight matrix into ``lr × 0.001 × ‖W‖``, which
suits MAE's ~7,000 steps at lr 6.4; on small sets it barely moves the head: on the digits (6 steps per epoch at batch
256) a 600-step quickstart DiT probes at 0.31 top-1 with LARS at base_lr 0.1, 0.97 with base_lr 10 and 0.95 with SGD at 0.1.
Use ``--optimizer sgd`` (MAE: "SGD works similarly") or a larger ``--base_lr`` there.

UMD's protocol (big_vision ``configs/ae_i1k_lp.py`` + ``trainers/linear_ae.py``) is the preset
``configs/umd/linear_probe.yaml`` (``maskdiff probe --config``): register-mean features, ``BatchNorm(eps 1e-5)`` +
linear, ``optax.lars`` (``lars_optax``) with weight decay 5e-5, lr 0.1 × 4096 / 256, 100 epochs, 5 of them warm-up,
cosine to 0. Not reproduced: its inception-crop + flip training views (features here are cached once, as above), flax's
lecun-normal init of the linear layer (trunc-normal std 0.01 here) and flax's biased running variance in the BatchNorm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from maskdiff.backbones.features import FeatureSpec
from maskdiff.data import ShardsDataModule, default_cache_dir
from maskdiff.evaluation.few_shot import few_shot_probe
from maskdiff.evaluation.lars import LARS
from maskdiff.files import save_torch
from maskdiff.methods.checkpoints import require_file
from maskdiff.progress import progress as progress_bar

log = logging.getLogger("maskdiff.evaluation")

CACHE_VERSION = 1
SMALL_HEAD_WORK = 2**24
LOADER_KNOBS = {"batch_size", "val_batch_size", "num_workers", "epochs_seen", "prepare_data_per_node",
                "allow_zero_length_dataloader_with_multiple_devices"}


# ---------------------------------------------------------------------------------------------- head & training
def linear_head(
    feature_dim: int, num_classes: int, generator: torch.Generator | None = None, bn_eps: float = 1e-6
) -> nn.Sequential:
    """MAE's probe head: ``BatchNorm1d(D, affine=False, eps=bn_eps)`` (MAE 1e-6, UMD 1e-5) then ``Linear(D, C)``
    (trunc-normal std 0.01, zero bias), built on the CPU without drawing from the global random stream (``generator``
    seeds the weights)."""
    with torch.random.fork_rng(devices=[]):
        head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=bn_eps), nn.Linear(feature_dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head


def warmup_cosine(epoch: float, peak_lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """MAE's ``adjust_learning_rate`` at a fractional ``epoch``: linear warmup, then half-cycle cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return peak_lr
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of ``logits (M, C)`` whose label ``(M,)`` is among the ``k`` largest (``k`` capped at C)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return hits.float().mean().item()


def check_labels(labels: torch.Tensor | None, split: str, what: str = "data") -> torch.Tensor:
    """``labels (M,)`` as int64, or ValueError when they are missing or not class indices."""
    if labels is None:
        raise ValueError(f"the {split} split of the {what} gives no labels (batches are bare images); "
                         "a linear probe needs (images, labels) batches")
    labels = labels.long()
    negative = int((labels < 0).sum())
    if negative == labels.numel():
        raise ValueError(f"the {split} split of the {what} is unlabelled (all {negative} labels are {int(labels[0])}); "
                         "a linear probe needs class labels >= 0")
    if negative:
        raise ValueError(f"{negative} of {labels.numel()} {split} labels are negative; expected class indices >= 0")
    return labels


@contextlib.contextmanager
def _few_threads_for_small_work(device: torch.device, work_per_step: int):
    """One CPU thread while training a small head: its many tiny ops gain nothing from intra-op threads, and on a busy
    machine waiting for the other threads makes each of them orders of magnitude slower."""
    if device.type != "cpu" or work_per_step >= SMALL_HEAD_WORK:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int = 90,
    batch_size: int = 16384,
    base_lr: float = 0.1,
    optimizer: Literal["lars", "lars_optax", "sgd"] = "lars",
    warmup_epochs: int = 10,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    bn_eps: float = 1e-6,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train MAE's linear head on cached features and score it; deterministic for a given ``seed`` and device.

    Args:
        train_features, train_labels: ``(M, D)`` features and ``(M,)`` class indices.
        val_features, val_labels: ``(M_val, D)`` and ``(M_val,)``.
        epochs: passes over the training features (MAE: 90; 50 for ViT-L/H).
        batch_size: batch size (MAE: 16384 over 32 GPUs), capped at M; the last partial batch of an epoch is dropped.
        base_lr: lr = ``base_lr × batch / 256``.
        optimizer: ``lars`` (MAE's: momentum 0.9, trust 0.001, biases neither decayed nor trust-scaled),
            ``lars_optax`` (``optax.lars``, UMD's: every parameter decayed and trust-scaled, lr inside the momentum;
            see :class:`LARS`) or ``sgd`` (momentum 0.9).
        warmup_epochs: linear warmup length in epochs (per iteration), then half-cycle cosine to 0.
        weight_decay: weight decay (MAE: 0).
        seed: seeds the head's init and the batch order.
        num_classes: classes of the head (default: the largest label + 1).
        device: where the head trains.
        bn_eps: the head's BatchNorm epsilon (MAE: 1e-6; UMD: 1e-5).
        progress: a bar of the epochs (with the last epoch's mean loss) on stderr; ``None``: when stderr is a
            terminal (see :mod:`maskdiff.progress`).

    Returns ``top1``, ``top5`` (held-out, fractions in [0, 1]), ``train_loss`` (mean of the last epoch), and the
    protocol: ``epochs, warmup_epochs, batch, base_lr, lr, optimizer, weight_decay, bn_eps, seed, num_train, num_val,
    num_classes, feature_dim, steps``.
    """
    if optimizer not in ("lars", "lars_optax", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of lars, lars_optax, sgd")
    if epochs < 1 or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"need epochs >= 1 and 0 <= warmup_epochs <= epochs, got epochs={epochs}, warmup_epochs={warmup_epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if train_features.ndim != 2 or val_features.ndim != 2 or train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"expected features (M, D) with the same D, got {tuple(train_features.shape)} and {tuple(val_features.shape)}")
    if len(train_labels) != len(train_features) or len(val_labels) != len(val_features):
        raise ValueError("each feature row needs one label")
    train_labels, val_labels = check_labels(train_labels, "train", "features"), check_labels(val_labels, "val", "features")
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    num_train, feature_dim = train_features.shape
    batch = min(batch_size, num_train)
    lr = base_lr * batch / 256
    steps_per_epoch = num_train // batch

    generator = torch.Generator().manual_seed(seed)
    head = linear_head(feature_dim, num_classes, generator, bn_eps).to(device)
    if optimizer in ("lars", "lars_optax"):
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay, flavour="optax" if optimizer == "lars_optax" else "mae")
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    features, labels = train_features.float().to(device), train_labels.to(device)

    with _few_threads_for_small_work(torch.device(device), batch * feature_dim * num_classes):
        head.train()
        epoch_loss = torch.zeros((), device=device)
        with progress_bar(range(epochs), desc="probe head", unit="epoch", enabled=progress) as bar:
            for epoch in bar:
                order = torch.randperm(num_train, generator=generator).to(device)
                epoch_loss.zero_()
                for step in range(steps_per_epoch):
                    for group in opt.param_groups:
                        group["lr"] = warmup_cosine(epoch + step / steps_per_epoch, lr, warmup_epochs, epochs)
                    rows = order[step * batch : (step + 1) * batch]
                    loss = F.cross_entropy(head(features[rows]), labels[rows])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    epoch_loss += loss.detach()
                if not bar.disable:
                    bar.set_postfix(loss=f"{(epoch_loss / steps_per_epoch).item():.4f}")

        head.eval()
        with torch.no_grad():
            logits = torch.cat([head(chunk.float().to(device)) for chunk in val_features.split(65536)]).cpu()
    return {
        "top1": topk_accuracy(logits, val_labels, 1),
        "top5": topk_accuracy(logits, val_labels, 5),
        "train_loss": (epoch_loss / steps_per_epoch).item(),
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "batch": batch,
        "base_lr": base_lr,
        "lr": lr,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "bn_eps": bn_eps,
        "seed": seed,
        "num_train": num_train,
        "num_val": len(val_features),
        "num_classes": num_classes,
        "feature_dim": feature_dim,
        "steps": steps_per_epoch * epochs,
    }


# ---------------------------------------------------------------------------------------------- data
def load_datamodule(data: L.LightningDataModule | str) -> L.LightningDataModule:
    """A data module, or one built from a YAML file: its ``data:`` section (a ``maskdiff fit`` config) or the whole
    file when it is itself ``class_path`` + ``init_args``."""
    if isinstance(data, L.LightningDataModule):
        return data
    path = require_file(data, "data config")
    config = yaml.safe_load(path.read_text()) or {}
    section = config.get("data", config) if isinstance(config, dict) else None
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{path} has no data section with a class_path (expected e.g. the `data:` of configs/quickstart.yaml)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=L.LightningDataModule)
    return parser.instantiate_classes(parser.parse_object({"data": section})).data


def train_split_batches(datamodule: L.LightningDataModule) -> Iterable[Any]:
    """The training split read once, without augmentation: batches ``(images, labels)``.

    Shard data modules (:class:`~maskdiff.data.ImageShardsDataModule`, digits) train on a resampled endless stream,
    so this reads the training shards as an exactly-once evaluation stream instead: every sample once (the first
    ``train_samples_per_epoch`` when the shards have no manifest). Any other data module gives one epoch of its
    ``train_dataloader()`` (exactly once if its loader is a plain map-style loader without ``drop_last``).
    """
    if not isinstance(datamodule, ShardsDataModule):
        loader = datamodule.train_dataloader()
        log.warning("%s: features of one epoch of train_dataloader() (%s batches); exact-once only if that loader is",
                    type(datamodule).__name__, len(loader) if hasattr(loader, "__len__") else "?")
        return loader
    return datamodule.train_split_once()


def data_identity(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The data module's class and plain settings (loader knobs such as batch size left out), for cache keys."""
    settings = {
        name: value for name, value in sorted(vars(datamodule).items())
        if not name.startswith("_") and name not in LOADER_KNOBS and isinstance(value, (str, int, float, bool, type(None)))
    }
    for name in ("image_size", "channels", "num_classes"):
        if hasattr(type(datamodule), name):
            settings[name] = getattr(datamodule, name)
    return {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", **settings}


# ---------------------------------------------------------------------------------------------- cache
def default_feature_cache() -> Path:
    return default_cache_dir() / "features"


def feature_cache_path(cache_dir: str | Path, ckpt: str | Path, spec: FeatureSpec, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """``(path, key)``: the cache file of a checkpoint's features, keyed by the checkpoint (path, mtime, size), the
    resolved feature spec and the data."""
    ckpt = Path(ckpt).expanduser().resolve()
    stat = ckpt.stat()
    key = {"version": CACHE_VERSION, "ckpt": str(ckpt), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size,
           "spec": spec.as_dict(), "data": data}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{ckpt.stem}-{digest}.pt", key


def save_features(path: Path, key: dict[str, Any], splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    save_torch({"key": key, **{f"{split}_{part}": tensor for split, (features, labels) in splits.items()
                               for part, tensor in (("features", features), ("labels", labels))}}, path)


def load_features(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return {split: (stored[f"{split}_features"], stored[f"{split}_labels"]) for split in ("train", "val")}
