"""A cache of the frozen LM prefix for training (issue #19).

Below the first cross-attention layer ``L`` the frozen LM never sees an image: for a
given training text the hidden states entering layer ``L`` are a fixed function of it.
They are computed once per sample and stored beside each shard ``X.tar`` as
``X.prefix-<fingerprint>.safetensors`` (or in ``data.prefix_cache_dir``): one (S, D)
tensor per sample key, in the run's storage dtype, with metadata holding a hash of each
sample's token ids and a hash of the shard's bytes.

The fingerprint hashes everything that decides the stored values: the LM's name, the
frozen weights below ``L`` (embedding and layers ``0..L-1``), ``L``, the dtype, the
added tokens' rows (they enter layers below ``L``), the system prompt, the sample
format and the token cap. A cache for another model, layer or dtype therefore has
another name and is never opened; a changed shard fails the shard hash and is rebuilt;
the loader checks every sample's ids against the stored hash and raises on a mismatch.
Files are written under a temporary name, flushed and renamed (:class:`vlm.fileio.AtomicFile`),
so a half-written cache never has the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from vlm.fileio import AtomicFile
from vlm.tario import ShardError, iter_tar_samples

from .decode import decode_sample, example_segments, fit_tokens
from .shards import as_raw, expand_shards

if TYPE_CHECKING:
    from vlm.processor import Processor

FORMAT_VERSION = "1"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ids_hash(ids: list[int]) -> str:
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=12).hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def model_fingerprint(model, storage: str, processor: Processor) -> str:
    """A hash of what decides the prefix of every text: see the module docstring."""
    layer = model.first_cross_attn_layer
    h = hashlib.blake2b(digest_size=8)
    h.update(f"v{FORMAT_VERSION}|{model.config.lm.name}|{layer}|{storage}|{processor.system_prompt!r}".encode())
    h.update(_tensor_bytes(model.embed.base.weight))
    h.update(_tensor_bytes(model.embed.new_rows))
    layers = model.decoder_layers()
    for i in range(layer):
        for name, t in sorted(layers[i].state_dict().items()):
            h.update(name.encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def source_fingerprint(model_print: str, kind: str, max_tokens: int) -> str:
    return hashlib.blake2b(f"{model_print}|{kind}|{max_tokens}".encode(), digest_size=8).hexdigest()


def cache_path(shard: str | os.PathLike, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> Path:
    shard = Path(shard)
    folder = Path(cache_dir) if cache_dir else shard.parent
    return folder / f"{shard.stem}.prefix-{fingerprint}.safetensors"


def read_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a complete cache file, or None if there is none (or it is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, ValueError, RuntimeError, Exception):  # a damaged file is a missing one
        return None


def is_fresh(shard: str, path: Path) -> bool:
    meta = read_metadata(path) if path.is_file() else None
    return bool(meta) and meta.get("version") == FORMAT_VERSION and meta.get("shard_hash") == file_hash(shard)


def encode_for_cache(processor: Processor, raw: dict, kind: str, max_tokens: int) -> list[int]:
    """A sample's token ids exactly as the loader makes them (decode → segments → cap)."""
    example = decode_sample(raw, kind)
    ids, labels = processor.encode(example_segments(processor, example))
    ids, _, _ = fit_tokens(ids, labels, max_tokens)
    return ids


def _samples(shard: str) -> Iterator[dict]:
    try:
        for sample in iter_tar_samples(shard):
            if not sample.problem:
                yield as_raw(sample)
    except ShardError:
        return  # a damaged shard's rest is unreadable for the loader too


def build_shard(
    model,
    processor: Processor,
    shard: str,
    path: Path,
    kind: str,
    max_tokens: int,
    storage: str,
    batch_size: int = 16,
    autocast=None,
    bar: tqdm | None = None,
) -> tuple[int, int]:
    """Compute and publish the cache of one shard; returns ``(samples, bytes)``."""
    from safetensors.torch import save_file

    device = next(model.parameters()).device
    dtype = STORAGE_DTYPES[storage]
    tensors: dict[str, torch.Tensor] = {}
    hashes: dict[str, str] = {}
    pending: list[tuple[str, list[int]]] = []

    def flush() -> None:
        if not pending:
            return
        batch = processor.collate([(ids, ids) for _, ids in pending], [[] for _ in pending])
        ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            hidden = model.prefix_hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for i, (key, ids) in enumerate(pending):
            tensors[key] = hidden[i, : len(ids)].to("cpu", dtype).contiguous()  # (S, D)
            hashes[key] = ids_hash(ids)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    encoded = []
    for raw in _samples(shard):
        try:
            ids = encode_for_cache(processor, raw, kind, max_tokens)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 (the loader skips this sample too, and counts it)
            continue
        encoded.append((raw["__key__"], ids))
    # Batches of near-equal lengths: a batch in shard order pads every sample to its longest.
    encoded.sort(key=lambda item: len(item[1]))
    for start in range(0, len(encoded), batch_size):
        pending.extend(encoded[start : start + batch_size])
        flush()
    meta = {
        "version": FORMAT_VERSION,
        "shard_hash": file_hash(shard),
        "ids": json.dumps(hashes),
        "kind": kind,
        "storage": storage,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return len(tensors), path.stat().st_size


@dataclass
class CacheReport:
    built: int = 0
    fresh: int = 0
    samples: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        per_k = self.bytes / max(self.samples, 1) * 1000 / 2**20
        return (
            f"prefix cache: {len(self.files)} files ({self.built} built, {self.fresh} up to date), "
            f"{self.samples} samples, {self.bytes / 2**20:.1f} MiB ({per_k:.1f} MiB per 1,000 samples)"
        )


def ensure(
    model,
    processor: Processor,
    sources: list,
    storage: str,
    cache_dir: str | None = None,
    batch_size: int = 16,
    autocast=None,
    log: Callable[[str], None] = print,
) -> tuple[list[str], CacheReport]:
    """Build the missing or stale caches of every source's shards; returns each source's
    fingerprint and a report. ``sources``: objects with ``shards``, ``kind``, ``max_tokens``."""
    base = model_fingerprint(model, storage, processor)
    prints, report = [], CacheReport()
    todo: list[tuple[str, Path, object]] = []
    for source in sources:
        fp = source_fingerprint(base, source.kind, source.max_tokens)
        prints.append(fp)
        for shard in expand_shards(source.shards):
            path = cache_path(shard, fp, cache_dir)
            if is_fresh(shard, path):
                meta = read_metadata(path)
                report.fresh += 1
                report.samples += len(json.loads(meta["ids"]))
                report.bytes += path.stat().st_size
                report.files.append(str(path))
            else:
                if path.is_file():
                    log(f"prefix cache {path} is stale (its shard changed): rebuilding")
                todo.append((shard, path, source))
    if todo:
        was_training = model.training
        model.eval()
        bar = tqdm(desc="prefix cache", unit=" samples", dynamic_ncols=True, file=sys.stderr)
        for shard, path, source in todo:
            n, size = build_shard(
                model, processor, shard, path, source.kind, source.max_tokens, storage, batch_size, autocast, bar
            )
            report.built += 1
            report.samples += n
            report.bytes += size
            report.files.append(str(path))
        bar.close()
        model.train(was_training)
    log(report.summary())
    return prints, report


class PrefixLookup:
    """The loader's side: each sample's cached prefix, checked against its token ids.

    Picklable (the DataLoader sends it to its workers); each worker opens the cache files
    it needs once and keeps them open."""

    def __init__(self, fingerprints: list[str], cache_dir: str | None = None):
        self.fingerprints = fingerprints
        self.cache_dir = cache_dir
        self._open: dict[str, tuple[object, dict[str, str]]] = {}

    def __getstate__(self) -> dict:
        return {"fingerprints": self.fingerprints, "cache_dir": self.cache_dir, "_open": {}}

    def _handle(self, shard: str, source: int):
        path = str(cache_path(shard, self.fingerprints[source], self.cache_dir))
        if path not in self._open:
            from safetensors import safe_open

            if not os.path.isfile(path):
                raise RuntimeError(f"no prefix cache {path} for shard {shard}: build it with vlm-data cache")
            handle = safe_open(path, framework="pt")
            self._open[path] = (handle, json.loads(handle.metadata()["ids"]))
        return self._open[path]

    def get(self, shard: str, source: int, key: str, ids: list[int]) -> torch.Tensor:
        handle, hashes = self._handle(shard, source)
        if hashes.get(key) != ids_hash(ids):
            raise RuntimeError(
                f"the prefix cache of {shard} does not match sample {key!r} (its text or tokenizer changed "
                "since the cache was built); rebuild it (vlm-data cache) or train with --prefix_cache off"
            )
        return handle.get_tensor(key)  # (S, D)
