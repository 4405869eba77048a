"""Writing webdataset tar shards, atomically, and the sample formats they hold.

Formats (files of one sample share the basename ``key``):

- caption:     ``key.png``/``key.jpg``, ``key.txt`` (the caption), ``key.json`` (metadata)
- qa:          ``key.png``/``key.jpg``, ``key.json`` = ``{"turns": [[question, answer], ...]}``
- interleaved: ``key.json`` = ``{"items": [{"text": ...} | {"image": "0.png"}, ...]}`` and the
               images as ``key.0.png``, ``key.1.png``, …
- sketch:      ``key.png`` (the sketch), ``key.html`` (the target page body)

A shard is written under a temporary name and renamed when complete
(:class:`vlm.fileio.AtomicFile`), so a reader never sees a half-written shard under its
final name.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import webdataset as wds
from PIL import Image

from vlm.fileio import AtomicFile
from vlm.tario import ShardError, iter_tar_samples
from vlm.tasks import KINDS

if TYPE_CHECKING:
    from vlm.tario import TarSample

FORMATS = KINDS  # the sample formats: one per task (vlm.tasks)


def image_bytes(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else "PNG")
    return buf.getvalue()


def caption_sample(key: str, image: bytes, caption: str, meta: dict | None = None, ext: str = "png") -> dict:
    return {"__key__": key, ext: image, "txt": caption.encode(), "json": json.dumps(meta or {}).encode()}


def qa_sample(key: str, image: bytes, turns: list[tuple[str, str]], meta: dict | None = None, ext: str = "png") -> dict:
    payload = {"turns": [list(t) for t in turns], **(meta or {})}
    return {"__key__": key, ext: image, "json": json.dumps(payload).encode()}


def interleaved_sample(key: str, items: list[str | bytes], meta: dict | None = None) -> dict:
    """``items``: text pieces (str) and encoded PNG images (bytes), in document order."""
    sample: dict = {"__key__": key}
    listed = []
    for item in items:
        if isinstance(item, bytes):
            name = f"{sum(1 for x in listed if 'image' in x)}.png"
            sample[name] = item
            listed.append({"image": name})
        else:
            listed.append({"text": item})
    sample["json"] = json.dumps({"items": listed, **(meta or {})}).encode()
    return sample


def sketch_sample(key: str, sketch: bytes, html: str) -> dict:
    return {"__key__": key, "png": sketch, "html": html.encode()}


@dataclass
class ShardWriter:
    """Write samples into ``folder/prefix-000000.tar``, ``-000001``, … with at most
    ``max_samples`` samples or ``max_bytes`` bytes each. Use as a context manager."""

    folder: Path
    prefix: str
    max_samples: int = 1000
    max_bytes: int = 256 * 1024 * 1024
    written: list[Path] = field(default_factory=list)
    count: int = 0
    _index: int = 0
    _tar: wds.TarWriter | None = None
    _file: object = None
    _target: AtomicFile | None = None
    _in_shard: int = 0
    _bytes: int = 0

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self._target = AtomicFile(self.folder / f"{self.prefix}-{self._index:06d}.tar")
        self._file = open(self._target.tmp, "wb")  # noqa: SIM115 (closed in _close)
        self._tar = wds.TarWriter(self._file, encoder=False)
        self._in_shard = self._bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        self.written.append(self._target.commit())
        self._tar = None
        self._index += 1

    def write(self, sample: dict) -> None:
        key = sample.get("__key__", "")
        if not key or "." in key or "/" in key:
            # webdataset groups a sample's files by the name up to the first dot.
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._tar is not None and (self._in_shard >= self.max_samples or self._bytes + size > self.max_bytes):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._in_shard += 1
        self._bytes += size
        self.count += 1

    def abort(self) -> None:
        """Drop the shard being written (its temporary file), keep completed ones."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._target.discard()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close()
        else:
            self.abort()


def shard_pattern(paths: Iterable[Path]) -> str:
    """Brace pattern (``name-{000000..000009}.tar``) for consecutive shards of one prefix."""
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise ValueError("no shards")
    if len(paths) == 1:
        return str(paths[0])
    stem = paths[0].name.rsplit("-", 1)[0]
    first, last = (p.name.rsplit("-", 1)[1].split(".")[0] for p in (paths[0], paths[-1]))
    return str(paths[0].parent / f"{stem}-{{{first}..{last}}}.tar")


def expand_shards(spec: str | os.PathLike, must_exist: bool = True) -> list[str]:
    """Shard paths from a brace pattern, a folder (all its ``.tar`` files) or one file.
    ``must_exist=False`` keeps the missing ones, for a reader that reports them itself."""
    spec = str(spec)
    if os.path.isdir(spec):
        found = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in folder {spec}")
        return found
    import braceexpand

    paths = list(braceexpand.braceexpand(spec))
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and must_exist:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec} do not exist, e.g. {missing[0]}")
    return paths


def iter_tar(path: str | os.PathLike) -> Iterator[dict]:
    """Raw samples of one shard (for tests and tools): ``{"__key__", ext: bytes}``. Any
    damage raises :class:`~vlm.tario.ShardError`; readers that carry on past damage use
    :func:`~vlm.tario.iter_tar_samples` and count its problems."""
    for sample in iter_tar_samples(path):
        if sample.problem:
            raise ShardError(sample.problem, f"{path}: {sample.detail}")
        yield as_raw(sample)


def as_raw(sample: TarSample) -> dict:
    """A shard sample as the decoder takes it: ``{"__key__", ext: bytes}``."""
    return {**sample.members, "__key__": sample.key}  # the key last: a member named "x.__key__" cannot replace it
