"""Decoded-and-augmented images per second per loader worker: maskdiff's shard stream vs a PIL ImageFolder.

    python benchmarks/data_loader.py                          # 512 JPEGs of 256x256, 5 interleaved repeats
    python benchmarks/data_loader.py --num 1024 --height 375 --width 500 --repeats 7

Writes ``--num`` natural-looking JPEGs (smooth coloured noise, gradients and grain, quality 90) as a class
folder tree and, with ``maskdiff shards images``, as WebDataset shards. Then, for ``num_workers`` 0 and 1,
times one epoch of each loader (the first batch, which includes worker start-up, is not counted):

- ``maskdiff shards``: :class:`~maskdiff.data.ImageShardsDataModule`'s training stream, RandomResizedCrop
  224 (scale 0.2-1, bicubic) + horizontal flip, float batches in [-1, 1];
- ``maskdiff shards, uint8 batches``: the same with ``uint8_train_batches=True``: the loader stops at uint8
  batches, which the DataModule scales to [-1, 1] after moving them to the device (not timed here);
- ``maskdiff decoder on files``: the same decoder over the folder's files (isolates decoding from tar streaming);
- ``PIL ImageFolder``: ``torchvision.datasets.ImageFolder`` + ``RandomResizedCrop(224, bicubic)`` +
  ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``, shuffled.

Throughput per worker is images/s divided by ``max(num_workers, 1)``; torch runs one thread in every
process, as in DataLoader workers. Repeats are interleaved and medians reported, with the per-image cost
of each stage measured in-process. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from maskdiff.data import ImageDecoder, ImageShardsDataModule, write_image_shards
from maskdiff.data.transforms import decode_pixels, open_header, to_signed_float

OUTPUT_SIZE = 224
SCALE = (0.2, 1.0)


def natural_image(height: int, width: int, seed: int) -> Image.Image:
    """Smooth multi-octave colour noise over a gradient, with fine grain: JPEG sizes like ImageNet photos."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 7):
        cells = 2**octave
        coarse = (rng.random((cells + 1, cells + 1, 3)) * 255).astype(np.uint8)
        canvas += np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32) / 2**octave
    gradient = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32) * 120
    canvas = (canvas - canvas.min()) / (np.ptp(canvas) + 1e-6) * 200 + gradient
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def write_inputs(root: Path, num: int, height: int, width: int, classes: int = 8) -> tuple[Path, str, float]:
    """``root/folder/<class>/*.jpg`` and shards of the same files; returns (folder, shard pattern, mean KiB)."""
    folder = root / "folder"
    sizes = []
    for index in range(num):
        path = folder / f"class{index % classes}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        natural_image(height, width, seed=index).save(path, format="JPEG", quality=90)
        sizes.append(path.stat().st_size)
    manifest = write_image_shards(folder, root / "shards", prefix="bench", max_samples=64, progress=False)
    return folder, str(root / "shards" / manifest["splits"]["bench"]["pattern"]), statistics.mean(sizes) / 1024


class DecoderOnFiles(Dataset):
    """The folder's files through maskdiff's decoder (random crop and flip from a per-item seeded rng)."""

    def __init__(self, folder: Path, decoder: ImageDecoder):
        self.samples = datasets.ImageFolder(folder).samples
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        sample = {"__key__": str(index), "jpg": Path(path).read_bytes(), "cls": label}
        return self.decoder(sample, random.Random(index))


def pil_transform():
    return transforms.Compose([
        transforms.RandomResizedCrop(OUTPUT_SIZE, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def make_loader(kind: str, folder: Path, pattern: str, num: int, workers: int, batch_size: int):
    decoder = ImageDecoder(OUTPUT_SIZE, 3, 8, hflip=True, crop="random_resized", scale=SCALE)
    if kind.startswith("maskdiff shards"):
        module = ImageShardsDataModule(
            train_shards=pattern, image_size=OUTPUT_SIZE, channels=3, num_classes=8, batch_size=batch_size,
            num_workers=workers, crop="random_resized", scale=SCALE, hflip=True, train_samples_per_epoch=num,
            shuffle_buffer=256, seed=random.randrange(1 << 30), uint8_train_batches=kind.endswith("uint8 batches"),
        )
        return module.train_dataloader()
    if kind == "maskdiff decoder on files":
        dataset = DecoderOnFiles(folder, decoder)
        return DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, collate_fn=decoder.collate, drop_last=True)
    dataset = datasets.ImageFolder(folder, transform=pil_transform())
    return DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, drop_last=True)


def time_epoch(loader) -> float:
    """Images per second over one epoch, from the end of the first batch."""
    images, started = 0, None
    for batch, _ in loader:
        if started is None:
            started = time.perf_counter()
            continue
        images += len(batch)
    return images / (time.perf_counter() - started)


def stage_costs(folder: Path, repeats: int) -> dict[str, float]:
    """Median milliseconds per image of each stage, in this process (one thread)."""
    files = [path.read_bytes() for path in sorted(folder.rglob("*.jpg"))[:64]]
    rrc, to_tensor = pil_transform().transforms[0], transforms.Compose(pil_transform().transforms[2:])
    decoder = ImageDecoder(OUTPUT_SIZE, 3, 8, hflip=True, crop="random_resized", scale=SCALE)
    pil_images = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
    pil_crops = [rrc(image) for image in pil_images]
    uint8_crops = [decoder({"jpg": data, "cls": 0}, random.Random(0))[0] for data in files]
    stages = {
        "PIL decode (open + convert RGB)": lambda i: Image.open(io.BytesIO(files[i])).convert("RGB"),
        "PIL header + torchvision decode_image": lambda i: decode_pixels(files[i], 3, open_header(files[i])),
        "PIL RandomResizedCrop bicubic": lambda i: rrc(pil_images[i]),
        "PIL ToTensor + Normalize (224x224)": lambda i: to_tensor(pil_crops[i]),
        "maskdiff decoder (decode + uint8 crop + flip)": lambda i: decoder({"jpg": files[i], "cls": 0}, random.Random(i)),
        "maskdiff uint8 -> float in [-1, 1] (224x224)": lambda i: to_signed_float(uint8_crops[i]),
    }
    costs = {name: [] for name in stages}
    for _ in range(repeats):
        for name, stage in stages.items():
            started = time.perf_counter()
            for index in range(len(files)):
                stage(index)
            costs[name].append((time.perf_counter() - started) / len(files) * 1e3)
    return {name: statistics.median(values) for name, values in costs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=512, help="images written and read per epoch")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    kinds = ["maskdiff shards", "maskdiff shards, uint8 batches", "maskdiff decoder on files", "PIL ImageFolder"]
    with tempfile.TemporaryDirectory(prefix="maskdiff-loader-bench-") as tmp:
        folder, pattern, mean_kib = write_inputs(Path(tmp), args.num, args.height, args.width)
        rates: dict[tuple[str, int], list[float]] = {(kind, w): [] for kind in kinds for w in args.workers}
        for _ in range(args.repeats):
            for workers in args.workers:
                for kind in kinds:
                    loader = make_loader(kind, folder, pattern, args.num, workers, args.batch_size)
                    rates[kind, workers].append(time_epoch(loader) / max(workers, 1))
                    del loader
        costs = stage_costs(folder, args.repeats)

    print(f"{args.num} JPEGs {args.width}x{args.height} (mean {mean_kib:.1f} KiB), RandomResizedCrop {OUTPUT_SIZE} + flip, "
          f"batch {args.batch_size}, {args.repeats} interleaved repeats; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {date.today()}\n")
    print("| loader | num_workers | images/s per worker (median) | min-max | vs PIL ImageFolder |")
    print("|---|---:|---:|---:|---:|")
    for workers in args.workers:
        baseline = statistics.median(rates["PIL ImageFolder", workers])
        for kind in kinds:
            values = rates[kind, workers]
            median = statistics.median(values)
            print(f"| {kind} | {workers} | {median:.0f} | {min(values):.0f}-{max(values):.0f} | {median / baseline:.2f}x |")
    print("\n| stage (in-process, one thread) | ms per image (median) |")
    print("|---|---:|")
    for name, cost in costs.items():
        print(f"| {name} | {cost:.3f} |")


if __name__ == "__main__":
    main()
