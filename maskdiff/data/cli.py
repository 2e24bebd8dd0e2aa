"""``maskdiff shards <kind> ... OUT``: write WebDataset shard sets (plus ``manifest.json``) that the DataModules stream.

    maskdiff shards digits data/digits
    maskdiff shards images /data/imagenet/train /data/in1k-shards --prefix imagenet-train --shuffle_seed 0
    maskdiff shards moving-digits data/moving-digits --format frames
    maskdiff shards videos /data/kinetics400/train /data/k400-shards --split train --prefix k400
    maskdiff shards latents '/data/in1k/imagenet-train-{000000..001281}.tar' /data/in1k-latents --vae /models/sd-vae-ft-ema
"""

from __future__ import annotations

from maskdiff.data.digits import write_digits_shards
from maskdiff.data.image_writer import images_cli
from maskdiff.data.latents import latents_cli
from maskdiff.data.moving_digits import moving_digits_cli
from maskdiff.data.video_writer import videos_cli


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


SHARD_WRITERS = {"digits": digits, "images": images_cli, "moving-digits": moving_digits_cli, "videos": videos_cli, "latents": latents_cli}
