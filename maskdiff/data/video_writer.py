"""A folder of video files (or a file list) as Kinetics-style WebDataset shards (``maskdiff shards videos SRC OUT``).

Each sample keeps the video file's original bytes (no re-encoding) under its extension (``mp4``, ``webm``,
``avi``, ``mkv``, ``mov``), plus ``cls`` (integer label, when known) and ``json`` (``fps``, ``frames``,
``duration``, ``width``, ``height``, ``codec``, ``path`` and ``class``, from a PyAV probe).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import av

from .shards import MANIFEST_NAME, add_split_to_manifest, read_manifest, write_shards
from .video import VIDEO_EXTENSIONS


def list_videos(src: str | Path) -> tuple[list[tuple[Path, int | None, str | None]], list[str] | None]:
    """The videos of ``src`` as ``([(path, label, class name), ...], class names)``.

    ``src`` is either a folder with one subfolder per class (sorted names give labels 0, 1, ...; video
    files with a known extension are found recursively, in sorted order) -- then class names are
    returned -- or a text file with one ``path [label]`` per line (integer label; paths relative to
    the file's folder; blank lines and ``#`` comments ignored; no label: unlabelled) -- then ``None``.
    """
    src = Path(src).expanduser()
    if src.is_dir():
        classes = sorted(entry.name for entry in src.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        videos = [
            (path, label, name)
            for label, name in enumerate(classes)
            for path in sorted((src / name).rglob("*"))
            if path.is_file() and path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS
        ]
        if not videos:
            raise ValueError(f"{src} holds no class subfolders with {'/'.join(VIDEO_EXTENSIONS)} files")
        return videos, classes
    if not src.is_file():
        raise FileNotFoundError(f"no video folder or file list at {src}")
    videos = []
    for number, line in enumerate(src.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, _, tail = line.rpartition(" ")
        path, label = (head.strip(), int(tail)) if head and tail.isdigit() else (line, None)
        resolved = Path(path).expanduser()
        videos.append((resolved if resolved.is_absolute() else src.parent / resolved, label, None))
    if not videos:
        raise ValueError(f"{src} lists no videos (expected lines 'path label')")
    return videos, None


def probe_video(path: str | Path) -> dict:
    """``{"fps", "frames", "duration", "width", "height", "codec"}`` of a video file; raises if it cannot be decoded.

    The first frame is decoded to make sure the file is readable; ``frames`` comes from the container
    header or, when it has none (e.g. WebM), from counting the video packets.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        if next(iter(container.decode(stream)), None) is None:
            raise ValueError(f"{path} has no decodable video frame")
        info = {
            "fps": float(stream.average_rate or stream.guessed_rate or 0),
            "frames": int(stream.frames),
            "width": int(stream.codec_context.width),
            "height": int(stream.codec_context.height),
            "codec": stream.codec_context.name,
            "duration": float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None,
        }
        if info["duration"] is None and container.duration:
            info["duration"] = container.duration / av.time_base
    if info["frames"] == 0:
        with av.open(str(path)) as container:
            info["frames"] = sum(1 for packet in container.demux(video=0) if packet.size)
    if info["duration"] is None and info["fps"]:
        info["duration"] = info["frames"] / info["fps"]
    return info


def write_video_shards(
    src: str | Path,
    out: str | Path,
    split: str = "train",
    samples_per_shard: int = 100,
    prefix: str = "videos",
    progress: bool | None = None,
) -> dict:
    """Write the videos of ``src`` (see :func:`list_videos`) as ``{prefix}-{split}-%06d.tar`` shards.

    Sample keys are ``"%07d" % position`` in the listing. Files that PyAV cannot open or decode, or with
    an unknown extension, are skipped and listed under ``splits[split]["skipped"]`` as ``{"path", "reason"}``.
    The manifest's ``classes`` are the class folder names (folder input; labels index them) or the
    integer labels seen in this and earlier splits (file list; class names already in the manifest are
    kept); other splits in ``out`` are kept. ``progress``: a bar of the videos on stderr (``None``: when stderr is
    a terminal; see :mod:`maskdiff.progress`).
    """
    videos, class_names = list_videos(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[dict] = []
    labels_seen: set[int] = set()
    root = Path(src).expanduser() if class_names is not None else Path(src).expanduser().parent

    def samples() -> Iterator[dict]:
        for position, (path, label, class_name) in enumerate(videos):
            extension = path.suffix.lower().lstrip(".")
            try:
                if extension not in VIDEO_EXTENSIONS:
                    raise ValueError(f"unknown video extension {path.suffix!r}, expected one of {VIDEO_EXTENSIONS}")
                meta = probe_video(path)
                data = path.read_bytes()
            except (av.error.FFmpegError, OSError, ValueError) as error:
                skipped.append({"path": str(path), "reason": f"{type(error).__name__}: {error}"[:300]})
                continue
            name = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
            sample = {"__key__": f"{position:07d}", extension: data, "json": {**meta, "path": name, "class": class_name}}
            if label is not None:
                sample["cls"] = label
                labels_seen.add(label)
            yield sample

    shards = write_shards(samples(), str(out / f"{prefix}-{split}-%06d.tar"), samples_per_shard, progress=progress,
                          total=len(videos))
    names = [os.path.basename(shard["path"]) for shard in shards]
    entry = {
        "pattern": names[0] if len(names) == 1 else f"{prefix}-{split}-{{000000..{len(names) - 1:06d}}}.tar",
        "samples": sum(shard["samples"] for shard in shards),
        "shards": [{"path": name, "samples": shard["samples"]} for name, shard in zip(names, shards)],
        "skipped": skipped,
    }
    if not shards:
        raise ValueError(f"none of the {len(videos)} videos of {src} could be read: {skipped[:3]}")
    if class_names is not None:
        return add_split_to_manifest(out, split, entry, {"name": "videos", "classes": class_names})
    existing = out / MANIFEST_NAME
    earlier = read_manifest(existing).get("classes", []) if existing.is_file() else []
    if earlier and not all(isinstance(c, int) for c in earlier):
        return add_split_to_manifest(out, split, entry, {"name": "videos"})
    classes = sorted(labels_seen | set(earlier))
    return add_split_to_manifest(out, split, entry, {"name": "videos"}, updates={"classes": classes})
