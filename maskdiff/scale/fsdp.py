"""FSDP for maskdiff methods: shard the backbone's transformer blocks, whatever the backbone.

Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` takes the classes to wrap and to
activation-checkpoint as Python sets, which a YAML config cannot name generically. :class:`BackboneFSDPStrategy`
reads them from the module it trains (``module.backbone.block_classes``) when the model is set up, so one trainer
config (``configs/trainer/fsdp.yaml``) fits every method:

* every block of the live backbone (and of the EMA copy) is an FSDP unit, optionally activation-checkpointed;
* the backbone and its EMA copy are units of their own with the same layout, so each rank's EMA shard lines up with
  its live shard and the EMA update stays local (no gather);
* the frozen autoencoder (e.g. the SD VAE) is a plain object outside the module tree, so FSDP never shards it;
* gradient clipping by norm goes through the root FSDP module's ``clip_grad_norm_`` (Lightning's FSDP precision
  plugin refuses it, because plain ``clip_grad_norm_`` on shards gives the wrong norm);
* checkpoints are written atomically (:mod:`maskdiff.checkpoint_io`): a full checkpoint through
  :class:`~maskdiff.checkpoint_io.AtomicCheckpointIO`, a sharded one into a temporary directory that replaces the
  previous one when every rank has written; loading reads only data (``weights_only=True``, and the sharded
  ``.metadata`` through an unpickler that admits only its own classes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from maskdiff.checkpoint_io import AtomicCheckpointIO, checkpoint_problem, is_sharded_checkpoint, save_sharded
from maskdiff.files import save_torch


def _backbone_of(module: nn.Module) -> nn.Module:
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(
            f"{type(module).__name__} has no `backbone` module; BackboneFSDPStrategy shards the block classes of a "
            "maskdiff method's backbone (use lightning's FSDPStrategy with an explicit auto_wrap_policy otherwise)"
        )
    return backbone


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of ``module.backbone`` (``Backbone.block_classes``): the units to
    activation-checkpoint."""
    backbone = _backbone_of(module)
    classes = set(getattr(backbone, "block_classes", ()))
    if not classes:
        raise ValueError(
            f"{type(backbone).__name__} declares no block_classes; set them to its transformer block types so FSDP "
            "can wrap and checkpoint them"
        )
    return classes


def wrap_classes(module: nn.Module) -> set[type[nn.Module]]:
    """FSDP unit classes for ``module``: its backbone's block classes plus the backbone class itself (which makes
    the live backbone and its EMA copy two units with the same flat-parameter layout)."""
    return block_classes(module) | {type(_backbone_of(module))}


class ShardedNormClipping(FSDPPrecision):
    """:class:`FSDPPrecision` whose gradient clipping by norm uses the root FSDP module's ``clip_grad_norm_``
    (the total norm over all shards), set as :attr:`root_module` by :class:`BackboneFSDPStrategy`."""

    root_module: nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        if self.root_module is None:
            raise RuntimeError("gradient clipping by norm was called before BackboneFSDPStrategy wrapped the model")
        self.root_module.clip_grad_norm_(clip_val)


class BackboneFSDPStrategy(FSDPStrategy):
    """FSDP that wraps (and optionally activation-checkpoints) the backbone's ``block_classes``.

    Args:
        activation_checkpointing: recompute each block's activations in the backward pass (less memory, ~30% more
            compute).
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimizer state), ``SHARD_GRAD_OP``,
            ``NO_SHARD`` (DDP-like) or ``HYBRID_SHARD`` (shard within a node, replicate across nodes).
        state_dict_type: ``sharded`` (a directory, one file per rank; fast, reloads at any world size under FSDP;
            ``maskdiff convert fsdp DIR OUT.ckpt`` makes a plain checkpoint of it) or ``full`` (one file gathered
            on rank 0; loads anywhere).
        cpu_offload: keep parameters and gradients on the CPU between uses.
        limit_all_gathers: rate-limit all-gathers (bounds GPU memory; FSDP's default).
        **kwargs: other :class:`~lightning.pytorch.strategies.FSDPStrategy` arguments (``device_mesh``, ``timeout``,
            ``process_group_backend``, ``mixed_precision``, FSDP keywords).
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
        **kwargs: Any,
    ) -> None:
        for reserved in ("auto_wrap_policy", "activation_checkpointing_policy"):
            if kwargs.pop(reserved, None) is not None:
                raise ValueError(
                    f"BackboneFSDPStrategy sets {reserved} from the backbone's block_classes; use lightning's "
                    "FSDPStrategy to choose it by hand"
                )
        kwargs["checkpoint_io"] = kwargs.get("checkpoint_io") or AtomicCheckpointIO()
        super().__init__(
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            limit_all_gathers=limit_all_gathers,
            **kwargs,
        )
        self.activation_checkpointing = activation_checkpointing

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Save atomically: a full checkpoint on rank 0 through the checkpoint IO, a sharded one from every rank
        into a temporary directory that rank 0 completes with the metadata file and renames into place."""
        if storage_options is not None:
            raise TypeError("BackboneFSDPStrategy.save_checkpoint takes no storage_options")
        path = Path(self.broadcast(str(filepath)))
        if path.is_dir() and self._state_dict_type == "full" and not is_sharded_checkpoint(path):
            raise IsADirectoryError(f"the checkpoint path exists and is a directory: {path}")
        if self._state_dict_type == "full":
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, path)
            return
        shards = {"model": checkpoint.pop("state_dict")}
        optimizers = enumerate(checkpoint.pop("optimizer_states", []))
        shards.update({f"optimizer_{index}": state for index, state in optimizers})
        save_sharded(path, write=lambda folder: _distributed_checkpoint_save(shards, folder),
                     finish=lambda folder: save_torch(checkpoint, folder / _METADATA_FILENAME),
                     barrier=self.barrier, broadcast=self.broadcast, is_writer=self.global_rank == 0)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's FSDP loading with ``weights_only=True``, after checking that the file or the sharded
        ``.metadata`` holds only data (Lightning reads them with unpicklers that would run pickled code)."""
        if weights_only is False:
            raise ValueError(
                f"maskdiff loads checkpoints with weights_only=True only (no pickled code runs): {checkpoint_path}"
            )
        path = Path(self.broadcast(str(checkpoint_path)))
        problem = checkpoint_problem(path) if path.exists() else None
        if problem is not None:
            raise ValueError(f"{path} does not load as a checkpoint: {problem}")
        return super().load_checkpoint(path, weights_only=True)

    @property
    def precision_plugin(self) -> ShardedNormClipping:
        if self._precision_plugin is None:
            self._precision_plugin = ShardedNormClipping("32-true")
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: FSDPPrecision | None) -> None:
        if plugin is not None and not isinstance(plugin, FSDPPrecision):
            raise TypeError(f"FSDP needs an FSDPPrecision plugin, got {type(plugin).__name__}")
        if plugin is not None and not isinstance(plugin, ShardedNormClipping):
            plugin = ShardedNormClipping(plugin.precision, plugin.scaler)
        self._precision_plugin = plugin

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        module = self.lightning_module if self.lightning_module is not None else model
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(wrap_classes(module))
        if self.activation_checkpointing:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(block_classes(module))}
        wrapped_before = any(isinstance(submodule, FullyShardedDataParallel) for submodule in model.modules())
        on_cpu = self.root_device.type == "cpu" and not wrapped_before
        wrapped = self._wrap_on_cpu(model) if on_cpu else super()._setup_model(model)
        self.precision_plugin.root_module = wrapped
        return wrapped

    def _wrap_on_cpu(self, model: nn.Module) -> nn.Module:
        """FSDP over gloo on the CPU (tests, debugging): FSDP needs ``device_id=cpu`` there, which Lightning's
        ``_setup_model`` does not pass."""
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped
