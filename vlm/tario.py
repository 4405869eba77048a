"""Reading webdataset tar shards without trusting them.

A tar header states its member's size, and readers believe it: a forged header that
claims a petabyte made readers allocate it or crawl through it. Here every declared size
is checked against the file's real size and a per-member cap before anything is read, and
no read, tarfile's own included, can ask for more than what is left of the file.

Samples follow webdataset's layout: members sharing a name up to the first dot of the
file name (``dir/key.jpg``, ``dir/key.txt``) are consecutive and form one sample
``key`` with extensions ``jpg`` and ``txt``. Uncompressed tars only (the size checks need
the real offsets); the shards this project writes are plain tars.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

DEFAULT_MAX_MEMBER_BYTES = 128 * 1024 * 1024
"""Largest member read: a 4096×4096 16-bit RGBA PNG that does not compress is 128 MiB;
anything larger is no sample a model here can use."""

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split into key and extension
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, which are not sample data


class ShardError(Exception):
    """A shard that cannot be read (on from some point); ``reason`` is a short, countable label:
    ``missing shard``, ``unreadable shard``, ``not a tar file``, ``truncated shard`` or ``corrupt shard``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class TarSample:
    """One sample of a shard: ``members`` maps an extension (lower case) to its bytes."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None
    """Why the sample is unusable, a short countable label (``member too large``,
    ``truncated shard``, ``duplicate member``, ``unsupported member``), or None."""
    detail: str = ""
    """Which member and what is wrong with it, for a person."""


class _Bounded:
    """A file whose reads stop at its end whatever size is asked for: tarfile reads a pax or
    GNU long-name header's declared size in one call, and that size comes from the file."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size = file, size

    def read(self, n: int | None = -1) -> bytes:
        left = max(self.size - self.file.tell(), 0)
        return self.file.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def _next(tar: tarfile.TarFile, path: str) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except MemoryError:
        raise
    except OSError as e:
        raise ShardError("unreadable shard", f"{path}: {e.strerror or e}") from None
    except Exception as e:  # tarfile raises ReadError, ValueError, UnicodeError… on forged headers
        reason = "truncated shard" if "end of data" in str(e) else "corrupt shard"
        raise ShardError(reason, f"{path}: {e}") from None


def _check_end(file: _Bounded, offset: int, path: str) -> None:
    """tarfile ends quietly at a cut or invalid header; only a zero block is a real end."""
    file.seek(offset)
    block = file.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise ShardError("truncated shard", f"{path}: ends without the end-of-archive marker at byte {offset}")
    if any(block):
        raise ShardError("corrupt shard", f"{path}: an invalid header at byte {offset}")


def _entries(tar: tarfile.TarFile, file: _Bounded, path: str, cap: int) -> Iterator[tuple[str, str, bytes, str, str]]:
    """``(key, extension, data, problem, detail)`` per file member, in order."""
    while (info := _next(tar, path)) is not None:
        tar.members.clear()  # tarfile keeps every header it has read; a shard may hold millions
        if not info.isreg() or _META.match(info.name) or not (match := _NAME.match(info.name)):
            continue
        key, ext = match.group(1), match.group(2).lower()
        end = info.offset_data + info.size
        if info.size > cap:
            yield key, ext, b"", "member too large", f"{info.name} declares {info.size:,} bytes, over the {cap:,} limit"
            if end > file.size:
                return  # its declared data covers the rest of the file: no header after it can be found
            continue  # tar.next() seeks past it without reading
        if end > file.size:
            missing = end - file.size
            yield key, ext, b"", "truncated shard", f"{info.name}: the file ends {missing:,} bytes before its data does"
            return
        if info.issparse():
            yield key, ext, b"", "unsupported member", f"{info.name} is a sparse file"
            continue
        try:
            file.seek(info.offset_data)
            data = file.read(info.size)
        except OSError as e:
            raise ShardError("unreadable shard", f"{path}: {e.strerror or e}") from None
        yield key, ext, data, "", ""
    _check_end(file, tar.offset, path)


def iter_tar_samples(path: str | os.PathLike, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[TarSample]:
    """The samples of one shard, in order. A sample with a bad member comes with its
    ``problem`` set; a shard that cannot be read on raises :class:`ShardError` after the
    samples before the damage. Memory and time are bounded by the file's real size."""
    path = str(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below; a generator cannot open it in its with)
    except FileNotFoundError:
        raise ShardError("missing shard", path) from None
    except OSError as e:  # a folder, no permission, …
        raise ShardError("unreadable shard", f"{path}: {e.strerror or e}") from None
    with raw:
        file = _Bounded(raw, os.fstat(raw.fileno()).st_size)
        try:
            tar = tarfile.open(fileobj=file, mode="r:")
        except MemoryError:
            raise
        except Exception as e:  # ReadError for garbage, and whatever a forged first header provokes
            raw.seek(0)
            if raw.read(2) == b"\x1f\x8b":
                raise ShardError(
                    "not a tar file", f"{path}: gzip-compressed; shards must be plain tars (gunzip it)"
                ) from None
            raise ShardError("not a tar file", f"{path}: {e}") from None
        current: TarSample | None = None
        try:
            for key, ext, data, problem, detail in _entries(tar, file, path, max_member_bytes):
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key)
                if current.problem:
                    continue
                if problem or ext in current.members:
                    current.problem = problem or "duplicate member"
                    current.detail = detail or f"{key}.{ext} appears twice"
                else:
                    current.members[ext] = data
        except ShardError:
            if current is not None:
                yield current  # complete or not: the reader checks a sample's members
            raise
        if current is not None:
            yield current
