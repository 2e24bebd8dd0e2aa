"""WebDataset shard helpers: writing, manifests and URL expansion (the skip counter lives in :mod:`.faults`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import webdataset as wds

from maskdiff.files import atomic_open, write_json
from maskdiff.progress import progress as progress_bar

log = logging.getLogger("maskdiff.data")

MANIFEST_NAME = "manifest.json"
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def write_shards(
    samples: Iterable[dict],
    pattern: str,
    max_samples: int,
    max_bytes: int | None = None,
    progress: bool | None = None,
    total: int | None = None,
    desc: str | None = None,
) -> list[dict]:
    """Write samples to WebDataset tar shards.

    Args:
        samples: dicts with a ``__key__`` (no dots, unique) and extension-named members, e.g.
            ``{"__key__": "0042", "png": b"...", "cls": 3}``; written in the order given.
        pattern: printf-style shard path, e.g. ``"/dir/digits-train-%06d.tar"``.
        max_samples: most samples per shard.
        max_bytes: start a new shard once a shard holds this many payload bytes (``None``: no limit).
        progress: a bar of the samples written on stderr (``None``: when stderr is a terminal; see
            :mod:`maskdiff.progress`).
        total: number of samples, for the progress bar (default: ``len(samples)`` of a sequence).
        desc: the bar's name (default ``writing <pattern's file name>``).

    Returns:
        One ``{"path": str, "samples": int}`` per written shard, in order.

    Shards are byte-for-byte reproducible: members of a sample are written sorted by extension,
    with mtime 0 and a fixed owner and mode. Each shard is written to a temporary name next to it and renamed when
    complete (:func:`maskdiff.files.atomic_open`): an interrupted run leaves the shards it finished and no partial one.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    counts: dict[str, int] = {}
    if total is None and isinstance(samples, Sequence):
        total = len(samples)
    bar = progress_bar(samples, desc=desc or f"writing {Path(pattern).name}", total=total, unit="sample",
                       enabled=progress)
    shards = _AtomicShards()
    writer = wds.ShardWriter(
        pattern,
        maxcount=max_samples,
        maxsize=float("inf") if max_bytes is None else max_bytes,
        verbose=0,
        mtime=0,
        opener=shards.open,
        post=shards.commit,
    )
    try:
        for sample in bar:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key or "." in os.path.basename(key):
                raise ValueError(f"sample __key__ must be a non-empty string without '.', got {key!r}")
            writer.write(sample)
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
        if counts:
            writer.close()
    except BaseException as error:
        shards.discard(writer, error)
        raise
    finally:
        bar.close()
    if not counts:
        shards.discard(writer)
    return [{"path": path, "samples": n} for path, n in counts.items()]


class _AtomicShards:
    """The ``opener``/``post`` pair of a ``wds.ShardWriter`` that writes each shard atomically: ``open`` starts
    :func:`~maskdiff.files.atomic_open` of the shard, ``commit`` completes it (``post`` runs once the tar is
    closed), ``discard`` drops the one being written."""

    def __init__(self) -> None:
        self.pending: tuple[str, contextlib.AbstractContextManager] | None = None

    def open(self, fname: str):
        context = atomic_open(fname)
        handle = context.__enter__()
        self.pending = (fname, context)
        return handle

    def commit(self, fname: str) -> None:
        _, context = self.pending
        self.pending = None
        context.__exit__(None, None, None)

    def discard(self, writer: wds.ShardWriter, error: BaseException | None = None) -> None:
        """Close ``writer``'s tar stream and remove the shard it was writing; a write ``error`` is raised as the
        :class:`~maskdiff.files.WriteError` naming that shard."""
        if writer.tarstream is not None:
            with contextlib.suppress(Exception):
                writer.tarstream.close()
            writer.tarstream = None
        if self.pending is not None:
            _, context = self.pending
            self.pending = None
            stop = error if error is not None else RuntimeError("no samples")
            try:
                context.__exit__(type(stop), stop, stop.__traceback__)
            except BaseException as raised:
                if raised is not stop:
                    raise


def write_manifest(path: str | Path, info: dict) -> None:
    """Write ``info`` as a JSON manifest (sorted keys, atomically via a temporary file).

    The manifest layout used by maskdiff::

        {"classes": [...], "total": N,
         "splits": {"train": {"pattern": "x-train-{000000..000002}.tar", "samples": n,
                              "shards": [{"path": "x-train-000000.tar", "samples": k}, ...]}, ...}}

    Shard paths and patterns are relative to the manifest's folder.
    """
    write_json(path, info, sort_keys=True)


def read_manifest(path: str | Path) -> dict:
    """Read a JSON manifest written by :func:`write_manifest`."""
    return json.loads(Path(path).read_text())


def brace_pattern(prefix: str, num_shards: int) -> str:
    """The brace pattern of shards ``{prefix}-000000.tar ...`` (the file name itself for one shard)."""
    if num_shards == 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar"


def add_split_to_manifest(out: str | Path, split: str, entry: dict, info: dict, updates: dict | None = None) -> dict:
    """Write ``info``, ``updates`` and ``splits[split] = entry`` to ``out/manifest.json``, keeping the other splits.

    Raises ``ValueError`` naming the first key of ``info`` whose value differs from an existing
    manifest (the splits of one folder must describe the same kind of data); ``updates`` replace
    existing values unchecked. ``total`` becomes the sum of the splits' ``samples``.
    """
    path = Path(out) / MANIFEST_NAME
    manifest = read_manifest(path) if path.is_file() else {}
    for key, value in info.items():
        if key in manifest and manifest[key] != value:
            raise ValueError(
                f"{path} describes shards with {key}={manifest[key]!r}, these have {key}={value!r}: "
                "write them to another folder"
            )
    manifest.update(info)
    manifest.update(updates or {})
    manifest.setdefault("splits", {})[split] = entry
    manifest["total"] = sum(s["samples"] for s in manifest["splits"].values())
    write_manifest(path, manifest)
    return manifest


def expand_urls(pattern: str) -> list[str]:
    """Expand a brace pattern (``"a-{000000..000009}.tar"``; ``"::"`` joins several; ``${NAME}`` is the environment
    variable ``WDS_NAME``) into URLs, as WebDataset does."""
    urls = [url.strip() for url in wds.shardlists.expand_urls(pattern) if url.strip()]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    return urls


def is_remote(url: str) -> bool:
    """True for URLs read through a scheme (``pipe:``, ``http(s)://``, ``s3://``, ``gs://``, ...)."""
    if url.startswith(REMOTE_PREFIXES):
        return True
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"


def local_path(url: str) -> str:
    """The file path of a local URL (strips ``file://``/``file:``)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("file:"):
        return url[len("file:") :]
    return url


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """Paths of the local shards among ``urls`` that do not exist (remote URLs are not checked)."""
    return [local_path(url) for url in urls if not is_remote(url) and not os.path.isfile(local_path(url))]


def check_local_shards(urls: Sequence[str], pattern: str | None = None) -> None:
    """Raise ``FileNotFoundError`` naming the first missing local shard (remote URLs are not checked)."""
    missing = missing_local_shards(urls)
    if missing:
        source = f" (from shard pattern {pattern!r})" if pattern else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{source}")


def lookup_shard_counts(urls: Sequence[str]) -> list[int] | None:
    """Samples per shard from the ``manifest.json`` next to each local shard, or ``None``.

    Returns ``None`` when any URL is remote, has no manifest next to it, or is not listed in it.
    """
    by_folder: dict[str, dict[str, int]] = {}
    counts = []
    for url in urls:
        if is_remote(url):
            return None
        folder, name = os.path.split(os.path.abspath(local_path(url)))
        if folder not in by_folder:
            manifest_path = os.path.join(folder, MANIFEST_NAME)
            by_folder[folder] = _shard_counts(read_manifest(manifest_path)) if os.path.isfile(manifest_path) else {}
        if name not in by_folder[folder]:
            return None
        counts.append(by_folder[folder][name])
    return counts


def _shard_counts(manifest: dict) -> dict[str, int]:
    shard_lists = [manifest.get("shards", [])]
    shard_lists += [split.get("shards", []) for split in manifest.get("splits", {}).values()]
    return {os.path.basename(shard["path"]): int(shard["samples"]) for shards in shard_lists for shard in shards}
