"""``maskdiff probe``: offline linear probe of a checkpoint's frozen features (:mod:`maskdiff.evaluation.linear_probe`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L

from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_dataset_features, resolve_backbone, resolve_method_spec
from maskdiff.evaluation.linear_probe import (
    check_labels,
    data_identity,
    default_feature_cache,
    feature_cache_path,
    load_datamodule,
    load_features,
    run_linear_probe,
    save_features,
    train_split_batches,
)
from maskdiff.files import ensure_writable_directory, write_json
from maskdiff.methods.checkpoints import load_method, require_file


def format_table(result: dict[str, Any]) -> str:
    """The probe's settings and top-1/top-5 as an aligned two-column table."""
    keys = ["mode", "ckpt", "weights", "pooling", "depth", "timestep", "noise_t", "feature_dim", "num_train", "num_val",
            "num_classes", "epochs", "warmup_epochs", "batch", "base_lr", "lr", "optimizer", "weight_decay", "bn_eps", "top1", "top5"]
    width = max(map(len, keys))
    lines = ["maskdiff probe: offline linear probe (frozen features, BN + linear head)"]
    for key in keys:
        value = result.get(key)
        shown = f"{value:.4f}" if key in ("top1", "top5") else ("null" if value is None else value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def probe(
    ckpt: str,
    data: L.LightningDataModule | str,
    pooling: Literal["cls", "mean", "prefix_mean"] | None = None,
    depth: int | None = None,
    timestep: int | None = None,
    noise_t: int | None = None,
    noise_seed: int = 0,
    weights: Literal["ema", "raw"] = "ema",
    epochs: int = 90,
    warmup_epochs: int = 10,
    batch_size: int = 16384,
    base_lr: float = 0.1,
    optimizer: Literal["lars", "lars_optax", "sgd"] = "lars",
    weight_decay: float = 0.0,
    bn_eps: float = 1e-6,
    seed: int = 0,
    out: str = "probe.json",
    cache_dir: str | None = None,
    device: str = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Offline linear probe of frozen features (MAE's; UMD's: --config configs/umd/linear_probe.yaml): JSON + table.

        maskdiff probe --ckpt runs/quickstart/checkpoints/last.ckpt --data configs/quickstart.yaml --batch_size 256 --optimizer sgd

    A preset sets several options at once (options after it win): ``--config configs/umd/linear_probe.yaml`` is UMD's
    linear probe (big_vision ``ae_i1k_lp``: LARS as ``optax.lars``, weight decay 5e-5, 100 epochs, 5 warm-up epochs,
    BatchNorm eps 1e-5, batch 4096; add ``--noise_t 50`` for the DiT-like and MaskDiT-like baselines).

    Other data: ``--data.class_path maskdiff.data.ImageShardsDataModule --data.init_args.train_shards
    '/data/in1k-train-{000000..000639}.tar' --data.init_args.val_shards ... --pooling cls --device cuda``.

    Args:
        ckpt: maskdiff checkpoint (from ``fit`` or ``convert``).
        data: the labelled data: a config YAML whose ``data:`` section is used (e.g. ``configs/quickstart.yaml``), or
            ``--data.class_path ... --data.init_args.NAME VALUE``. The training split is read once, un-augmented;
            the held-out split is ``val_dataloader()``.
        pooling: ``cls`` (first prefix token; MAE's default), ``mean`` (patch tokens) or ``prefix_mean`` (UMD's
            registers); default: the backbone's ``default_pooling`` (``cls`` with a cls token, else ``mean``).
        depth: encoder blocks to run (0..num_blocks, no final norm); default all blocks + final norm.
        timestep: timestep of a time-conditioned backbone (DiT, MDT, UMD); default 0 (with ``noise_t``: ``noise_t`` +
            the method's time offset); must be unset for MAE.
        noise_t: probe noised inputs: the clean input is noised to this step of the method's own schedule before the
            backbone sees it, as UMD's paper probes its DiT-like and MaskDiT-like baselines (``--noise_t 50``: input
            at t = 50, UMD's backbone at t = 51); default clean inputs.
        noise_seed: seeds the noise of ``noise_t`` (each split draws it from one generator with this seed).
        weights: ``ema`` or ``raw`` backbone weights (``ema`` falls back to raw when the method keeps no EMA).
        epochs: head training epochs (MAE: 90).
        warmup_epochs: linear warmup epochs (MAE: 10).
        batch_size: head batch size, capped at the training-set size (MAE: 16384).
        base_lr: lr = base_lr × batch / 256 (MAE: 0.1).
        optimizer: ``lars`` (MAE), ``lars_optax`` (``optax.lars``: UMD) or ``sgd`` (momentum 0.9; better on small data
            sets, see the module notes).
        weight_decay: head weight decay (MAE: 0; UMD: 5e-5).
        bn_eps: the head's BatchNorm epsilon (MAE: 1e-6; UMD: 1e-5).
        seed: seeds the head init and batch order.
        out: JSON file to write.
        cache_dir: feature cache folder (default ``$MASKDIFF_CACHE/features`` or ``~/.cache/maskdiff/features``).
        device: torch device for feature extraction and head training.
        progress: bars of the feature extraction (batches per split) and the head's training (epochs) on stderr;
            default: when stderr is a terminal (or ``MASKDIFF_PROGRESS=1``).
    """
    require_file(ckpt)
    ensure_writable_directory(Path(out).expanduser().parent, "--out directory")
    ensure_writable_directory(cache_dir or default_feature_cache(), "feature cache directory")
    module = load_method(ckpt, map_location=device).to(device).eval()
    use_ema = weights == "ema" and module.ema_backbone is not None
    if weights == "ema" and not use_ema:
        print(f"note: {ckpt} has no EMA weights; probing the raw weights", file=sys.stderr)
    backbone = resolve_backbone(module, use_ema)
    if pooling is None:
        pooling = backbone.default_pooling
    spec = resolve_method_spec(module, FeatureSpec(pooling=pooling, depth=depth, timestep=timestep, use_ema=use_ema,
                                                   noise_t=noise_t, noise_seed=noise_seed))
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs {warmup_epochs} must lie in 0..epochs ({epochs})")

    datamodule = load_datamodule(data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.check_data(datamodule)
    module.inputs_pre_encoded = bool(getattr(datamodule, "pre_encoded", False))
    cache_path, key = feature_cache_path(cache_dir or default_feature_cache(), ckpt, spec, data_identity(datamodule))
    if cache_path.is_file():
        splits = load_features(cache_path)
        print(f"features: reusing {cache_path}", file=sys.stderr)
    else:
        val_loader = datamodule.val_dataloader()
        if isinstance(val_loader, (list, tuple)) and not val_loader:
            raise ValueError(f"{type(datamodule).__name__} has no held-out split (val_dataloader() is empty); the probe needs one")
        splits = {}
        for split, batches in (("train", train_split_batches(datamodule)), ("val", val_loader)):
            features, labels = extract_dataset_features(module, batches, spec, progress=progress,
                                                         desc=f"features ({split})")
            splits[split] = (features, check_labels(labels, split, type(datamodule).__name__))
        save_features(cache_path, key, splits)
        print(f"features: cached in {cache_path}", file=sys.stderr)
    for split, (_, labels) in splits.items():
        check_labels(labels, split, type(datamodule).__name__)

    result = run_linear_probe(
        *splits["train"], *splits["val"], epochs=epochs, batch_size=batch_size, base_lr=base_lr, optimizer=optimizer,
        warmup_epochs=warmup_epochs, weight_decay=weight_decay, bn_eps=bn_eps, seed=seed,
        num_classes=getattr(datamodule, "num_classes", None), device=device, progress=progress,
    )
    result = {"mode": "offline", "ckpt": str(ckpt), "data": data_identity(datamodule)["class"], **spec.as_dict(),
              **result, "feature_cache": str(cache_path)}
    out_path = write_json(Path(out).expanduser(), result)
    print(format_table(result))
    print(f"wrote {out_path}")
    return result
