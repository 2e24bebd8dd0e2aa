"""An image folder (or a file list) as ImageNet-style WebDataset shards (``maskdiff shards images SRC OUT``).

Each sample keeps the image file's original bytes (no re-encoding, so no new JPEG artefacts) under its
normalised extension (``jpg``, ``png``, ``webp``), plus ``cls`` (integer label, when known) and ``json``
(``path`` relative to SRC, and ``class`` for folder input). Shards are ``OUT/{prefix}-%06d.tar``; the
``manifest.json`` next to them records the sample counts that :class:`~maskdiff.data.ImageShardsDataModule`
reads, under ``splits[prefix]``.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from .shards import (
    MANIFEST_NAME,
    add_split_to_manifest,
    brace_pattern,
    read_manifest,
    write_shards,
)

log = logging.getLogger("maskdiff.data")

EXTENSION_MEMBERS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True)
class ImageEntry:
    """One image to write: its file, integer label (``None``: unlabelled) and class folder name."""

    path: Path
    label: int | None
    class_name: str | None = None


def member_name(path: Path) -> str:
    """The shard member extension of an image file (``.JPEG``/``.jpeg`` -> ``jpg``); ``ValueError`` if unsupported."""
    extension = path.suffix.lower().lstrip(".")
    if extension not in EXTENSION_MEMBERS:
        raise ValueError(f"unsupported image extension {path.suffix!r} of {path}, expected one of {sorted(EXTENSION_MEMBERS)}")
    return EXTENSION_MEMBERS[extension]


def list_images(src: str | Path) -> tuple[list[ImageEntry], list[str] | None, Path]:
    """The images of ``src`` as ``(entries, class names, root of the relative paths)``.

    ``src`` is either a folder with one subfolder per class (sorted folder names give labels 0, 1, ...;
    ``jpg/jpeg/png/webp`` files in any letter case, found recursively, sorted) -- then the class names
    are returned -- or a text file with one ``path label`` or one ``path`` per line (all lines alike;
    paths relative to the file's folder; blank lines and ``#`` comment lines ignored) -- then ``None``.
    """
    src = Path(src).expanduser()
    if src.is_dir():
        classes = sorted(entry.name for entry in src.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        entries = [
            ImageEntry(path, label, name)
            for label, name in enumerate(classes)
            for path in sorted((src / name).rglob("*"))
            if path.is_file() and path.suffix.lower().lstrip(".") in EXTENSION_MEMBERS
        ]
        if not entries:
            raise ValueError(f"{src} holds no class subfolders with {'/'.join(sorted(EXTENSION_MEMBERS))} files")
        return entries, classes, src
    if not src.is_file():
        raise FileNotFoundError(f"no image folder or file list at {src}")
    entries = []
    for number, line in enumerate(src.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, tail = line.rpartition(" ")
        labelled = bool(head.strip()) and tail.lstrip("-").isdigit()
        path, label = (head.strip(), int(tail)) if labelled else (line, None)
        if entries and (label is None) != (entries[0].label is None):
            raise ValueError(f"{src}:{number}: {line!r} -- lines must all be 'path label' or all be 'path'")
        if label is not None and label < 0:
            raise ValueError(f"{src}:{number}: label {label} must be >= 0")
        resolved = Path(path).expanduser()
        entries.append(ImageEntry(resolved if resolved.is_absolute() else src.parent / resolved, label))
    if not entries:
        raise ValueError(f"{src} lists no images (expected lines 'path label' or 'path')")
    return entries, None, src.parent


def read_image(path: Path, verify: Literal["header", "decode"] = "header") -> bytes:
    """The file's bytes after checking that PIL reads them: the header (fast) or the whole image (``decode``)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if verify == "decode":
            image.load()
        else:
            image.verify()
    return data


def _ordered_map(function: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """``map(function, items)`` in order, ``workers`` threads, at most ``window`` results pending."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_image_shards(
    src: str | Path,
    out: str | Path,
    prefix: str = "images",
    max_samples: int = 1000,
    max_bytes: int | None = None,
    shuffle_seed: int | None = None,
    metadata: bool = True,
    verify: Literal["header", "decode"] = "header",
    workers: int = 8,
    progress: bool | None = None,
) -> dict:
    """Write the images of ``src`` (see :func:`list_images`) as ``OUT/{prefix}-%06d.tar`` shards.

    Sample keys are ``"%08d" % position`` in the sorted listing (also after ``shuffle_seed`` reorders the
    samples, with ``random.Random(shuffle_seed)``). The same input and arguments give byte-identical shards
    and manifest. Files that cannot be read, have an unsupported extension or fail ``verify`` are skipped
    and listed under ``splits[prefix]["skipped"]`` as ``{"path", "reason"}``. The manifest's ``classes``
    are the class folder names (folder input; labels index them) or the integer labels seen in this and
    earlier splits (file list); other splits in ``out`` are kept. ``progress``: a bar of the images on stderr
    (``None``: when stderr is a terminal; see :mod:`maskdiff.progress`).

    Returns:
        The manifest.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
    if verify not in ("header", "decode"):
        raise ValueError(f"verify must be 'header' or 'decode', got {verify!r}")
    entries, class_names, root = list_images(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(entries)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    skipped: list[dict] = []
    labels_seen: set[int] = set()

    def load(position: int) -> tuple[int, bytes | None, str | None]:
        try:
            member_name(entries[position].path)
            return position, read_image(entries[position].path, verify), None
        except Exception as error:  # noqa: BLE001 -- any unreadable file is skipped and listed
            return position, None, f"{type(error).__name__}: {error}"[:300]

    def samples() -> Iterator[dict]:
        for position, data, reason in _ordered_map(load, order, workers, window=4 * max(workers, 1)):
            entry = entries[position]
            name = os.path.relpath(entry.path, root) if entry.path.is_relative_to(root) else str(entry.path)
            if data is None:
                skipped.append({"path": name, "reason": reason})
                continue
            sample = {"__key__": f"{position:08d}", member_name(entry.path): data}
            if metadata:
                sample["json"] = {"path": name} | ({"class": entry.class_name} if entry.class_name is not None else {})
            if entry.label is not None:
                sample["cls"] = entry.label
                labels_seen.add(entry.label)
            yield sample

    shards = write_shards(
        samples(), str(out / f"{prefix}-%06d.tar"), max_samples, max_bytes=max_bytes, progress=progress,
        total=len(entries),
    )
    if not shards:
        raise ValueError(f"none of the {len(entries)} images of {src} could be read: {skipped[:3]}")
    names = [os.path.basename(shard["path"]) for shard in shards]
    _warn_about_stale_shards(out, prefix, len(names))
    entry = {
        "pattern": brace_pattern(prefix, len(names)),
        "samples": sum(shard["samples"] for shard in shards),
        "shards": [{"path": name, "samples": shard["samples"]} for name, shard in zip(names, shards)],
        "labelled": entries[0].label is not None,
        "skipped": skipped,
    }
    if class_names is not None:
        return add_split_to_manifest(out, prefix, entry, {"name": "images", "classes": class_names})
    if not labels_seen:
        return add_split_to_manifest(out, prefix, entry, {"name": "images"})
    existing = out / MANIFEST_NAME
    earlier = read_manifest(existing).get("classes", []) if existing.is_file() else []
    classes = sorted(labels_seen | {c for c in earlier if isinstance(c, int)})
    return add_split_to_manifest(out, prefix, entry, {"name": "images"}, updates={"classes": classes})


def _warn_about_stale_shards(out: Path, prefix: str, written: int) -> None:
    stale = sorted(
        path.name for path in out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar") if int(path.stem[-6:]) >= written
    )
    if stale:
        log.warning("%s holds %d older shards beyond the %d written now (%s ...): delete them", out, len(stale), written, stale[0])
