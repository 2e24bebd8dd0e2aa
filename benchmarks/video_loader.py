"""Clip loading speed: moving-digits MP4 shards vs pre-extracted frame-sequence (PNG) shards, 16-frame clips.

    python benchmarks/video_loader.py                        # 32x32 canvas, 256 videos per format, workers 0 and 1
    python benchmarks/video_loader.py --canvas 64 --glyph_size 32 --rounds 5

Writes both shard sets to a temporary folder, then streams training batches through
``VideoShardsDataModule.train_dataloader()`` (random temporal offset + random resized crop, the full training
path) with ``num_workers`` 0 (decoding in the main process) and 1 (one worker process): either way one process
decodes, so clips/s is per decoding worker. Configurations are timed in interleaved rounds after a warm-up
(each round first drains the batches a worker prefetched while idle) and the median round is reported, so
drift in machine speed affects all of them alike. Prints a markdown table, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from maskdiff.data import VideoShardsDataModule, write_moving_digits_shards
from maskdiff.data.moving_digits import mp4_codec


def shard_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.glob("moving-digits-train-*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--glyph_size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="video-loader-") as tmp:
        roots, iterators, sizes = {}, {}, {}
        for video_format in ("mp4", "frames"):
            roots[video_format] = Path(tmp) / video_format
            started = time.perf_counter()
            write_moving_digits_shards(roots[video_format], num_train=args.videos, num_val=1, num_frames=args.num_frames,
                                       canvas=args.canvas, glyph_size=args.glyph_size, format=video_format,
                                       samples_per_shard=64)
            sizes[video_format] = (shard_bytes(roots[video_format]) / args.videos, time.perf_counter() - started)
        for video_format, root in roots.items():
            for workers in args.workers:
                datamodule = VideoShardsDataModule(
                    str(root / f"moving-digits-train-{{000000..{(args.videos - 1) // 64:06d}}}.tar"),
                    num_frames=args.num_frames, frame_stride=1, image_size=args.canvas, channels=1, num_classes=10,
                    train_crop="random_resized", batch_size=args.batch, num_workers=workers, shuffle_buffer=64,
                    train_samples_per_epoch=10**9,
                )
                iterator = iter(datamodule.train_dataloader())
                for _ in range(3):
                    next(iterator)
                iterators[(video_format, workers)] = (iterator, 2 * workers)
        seconds = {key: [] for key in iterators}
        for _ in range(args.rounds):
            for key, (iterator, prefetched) in iterators.items():
                for _ in range(prefetched):
                    next(iterator)
                started = time.perf_counter()
                for _ in range(args.batches):
                    clips, _ = next(iterator)
                seconds[key].append(time.perf_counter() - started)
        assert clips.shape == (args.batch, 1, args.num_frames, args.canvas, args.canvas)
        del iterators
    clips_per_round = args.batch * args.batches
    rate = {key: clips_per_round / statistics.median(values) for key, values in seconds.items()}
    codec = mp4_codec()
    print(f"| shards | num_workers | clips/s | ms/clip | KB/video | write s/{args.videos} videos |")
    print("|---|---|---|---|---|---|")
    for (video_format, workers), value in rate.items():
        name = f"mp4 ({codec})" if video_format == "mp4" else "frames (PNG)"
        size, written = sizes[video_format]
        print(f"| {name} | {workers} | {value:.0f} | {1000 / value:.2f} | {size / 1024:.1f} | {written:.1f} |")
    result = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "clip": [args.num_frames, args.canvas, args.canvas], "batch": args.batch, "rounds": args.rounds,
        "clips_per_s": {f"{f}_w{w}": round(v, 1) for (f, w), v in rate.items()},
        "bytes_per_video": {f: round(s) for f, (s, _) in sizes.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
