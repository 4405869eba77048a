"""Durable writes and safe reads of weight files.

Writes: a file or folder is written under a temporary name, flushed to disk (``fsync``),
then renamed, and the rename itself is flushed (the parent folder's ``fsync``). Without
the flushes a power cut can leave a final name pointing at empty or partial data.

Reads: weight files are plain tensors. Safetensors by extension, anything else with
``torch.load(weights_only=True)``; a file that needs unpickling is refused, since
unpickling runs whatever code the file names.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace a small text file durably: a reader sees the old text or the new, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CONVERT_ADVICE = "Where you trust its source, convert it to safetensors."


class UnsafeFileError(ValueError):
    """A file that could only be read by unpickling arbitrary Python objects."""


def load_tensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from ``path`` as plain tensors (``.safetensors``, or a torch file that
    ``weights_only=True`` accepts; a ``{"state_dict": ...}`` wrapper is unwrapped)."""
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


def load_plain(path: str | os.PathLike, what: str = "file", advice: str = CONVERT_ADVICE) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers
    only. A file that names other Python objects raises :class:`UnsafeFileError`."""
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
