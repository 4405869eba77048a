"""Durable writes and safe reads of weight files.

Writes: a file or folder is written under a temporary name, flushed to disk (``fsync``),
then renamed, and the rename itself is flushed (the parent folder's ``fsync``). Without
the flushes a power cut can leave a final name pointing at empty or partial data. Every
writer in the project goes through :class:`AtomicFile` (or :func:`write_text` /
:func:`write_bytes`) for a file and :func:`atomic_folder` for a folder; a reader sees the
old version or the complete new one, and a failed or killed write leaves a hidden
``.NAME.tmp-…`` beside the target, never a partial file under its name.

Reads: weight files are plain tensors. Safetensors by extension, anything else with
``torch.load(weights_only=True)``; a file that needs unpickling is refused, since
unpickling runs whatever code the file names.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder for fsync; NTFS journals renames itself
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under ``root`` (and ``root``), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a completely written ``tmp`` (file or folder) to ``final`` durably: its
    contents reach the disk before the rename, and the rename before we return."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp) if tmp.is_dir() else fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)


class AtomicFile:
    """A new version of the file ``path``, written under a temporary name beside it
    (:attr:`tmp`) and then either committed (it replaces ``path`` durably, see
    :func:`publish`) or discarded (``path`` untouched). As a context manager it gives
    :attr:`tmp` and commits when the block ends normally, discards when it raises::

        with AtomicFile(path) as tmp:
            save_file(tensors, tmp)

    The caller creates the file (``open(tmp, "wb")``, ``save_file(..., tmp)``), so it gets
    the usual permissions."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")

    def commit(self) -> Path:
        try:
            publish(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace a file durably: a reader sees the old contents or the new, whole."""
    with AtomicFile(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace a text file (UTF-8) durably: a reader sees the old text or the new, whole."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill inside the ``with`` block; when the block
    ends normally it becomes ``path`` durably, every file in it flushed first. An existing
    ``path`` is replaced (moved aside, then deleted) or, with ``replace=False``, kept and
    the new folder dropped (another process made it first). When the block raises, the
    temporary folder is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if not replace and path.exists():
            shutil.rmtree(tmp)
            return
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        fsync_tree(tmp)  # on disk before the rename, or a power cut can leave a whole-looking empty folder
        old = None
        if path.exists():
            # os.replace cannot replace a folder that has files: move it aside first.
            old = path.with_name(f".{path.name}.tmp-old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


CONVERT_ADVICE = "Where you trust its source, convert it to safetensors."


class UnsafeFileError(ValueError):
    """A file that could only be read by unpickling arbitrary Python objects."""


def load_tensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from ``path`` as plain tensors (``.safetensors``, or a torch file that
    ``weights_only=True`` accepts; a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    obj = load_plain(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} {str(path)!r} does not hold a state dict of tensors")
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a ValueError naming it."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_plain(path: str | os.PathLike, what: str = "file", advice: str = CONVERT_ADVICE) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers
    only. A file that names other Python objects raises :class:`UnsafeFileError`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice to retry with weights_only=False; keep the fact.
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it names the Python object {named.group(1)}" if named else "it needs unpickling"
        raise UnsafeFileError(
            f"{what} '{path}' is not unpickled: it is not plain tensors and numbers ({reason}), "
            f"and unpickling runs whatever code a file names. {advice}"
        ) from None
