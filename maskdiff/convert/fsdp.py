"""Sharded FSDP checkpoint (a directory of ``torch.distributed.checkpoint`` files) -> one plain Lightning checkpoint.

``BackboneFSDPStrategy(state_dict_type="sharded")`` saves a directory that only FSDP can load. Consolidating it
(Lightning's ``consolidate_checkpoint`` reader, on one process, no GPU; ``maskdiff convert fsdp``) gives the file
that ``maskdiff sample``, ``evaluate``, ``probe`` and ``load_from_checkpoint`` read on one device, and that any
strategy can resume from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maskdiff.checkpoint_io import check_sharded_metadata


def consolidate_sharded_checkpoint(folder: str | Path, keep_optimizer_states: bool = False) -> dict[str, Any]:
    """The full checkpoint dict of a sharded FSDP checkpoint ``folder`` (model weights gathered on the CPU).

    ``keep_optimizer_states``: also keep the (full, unsharded) optimizer states, to resume under another
    strategy; without them the file holds the weights, hyperparameters and loop state only (about 1/3 the size
    with AdamW).
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    folder = Path(folder).expanduser()
    if not folder.is_dir() or not (folder / _METADATA_FILENAME).is_file() or not (folder / ".metadata").is_file():
        raise FileNotFoundError(
            f"{folder} is not a sharded FSDP checkpoint: expected a directory with .metadata, {_METADATA_FILENAME} and "
            "*.distcp files (written by BackboneFSDPStrategy with state_dict_type: sharded)"
        )
    check_sharded_metadata(folder)
    checkpoint = _format_checkpoint(_load_distributed_checkpoint(folder))
    if not keep_optimizer_states:
        checkpoint.pop("optimizer_states", None)
    return checkpoint
