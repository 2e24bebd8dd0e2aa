"""``maskdiff shards <kind> ... OUT``: write WebDataset shard sets (plus ``manifest.json``) that the DataModules stream.

    maskdiff shards digits data/digits
"""

from __future__ import annotations

from maskdiff.data.digits import write_digits_shards


def digits(out: str, samples_per_shard: int = 500, val_fraction: float = 1 / 6, seed: int = 0) -> dict:
    """Write scikit-learn's 1,797 real handwritten digits (8×8, grayscale PNG + ``cls``) as train/val shards.

    Args:
        out: output folder; gets ``digits-{train,val}-%06d.tar`` and ``manifest.json``.
        samples_per_shard: most samples per shard.
        val_fraction: share of the digits held out for validation (seeded split).
        seed: seed of the train/val split.
    """
    manifest = write_digits_shards(out, samples_per_shard=samples_per_shard, val_fraction=val_fraction, seed=seed, progress=True)
    splits = ", ".join(f"{name} {split['samples']} ({split['pattern']})" for name, split in manifest["splits"].items())
    print(f"wrote {out}: {splits}")
    return manifest


SHARD_WRITERS = {"digits": digits}
