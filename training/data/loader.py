"""Streaming batches from webdataset shards: split by node and worker, shuffled,
mixed from weighted sources, decoded robustly and tokenised in the worker processes.

Each batch is a dict of padded tensors (``input_ids``, ``attention_mask``, ``labels``
(B, S); ``images`` (B, T, C, H, W)), the samples' ``keys``, and ``skipped``: the
samples this worker skipped since its previous batch, by reason, so the trainer can
add them up and report them.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.processor import Processor

from .decode import DEFAULT_MAX_PIXELS, SkipCounter, SkipSample, decode_sample, example_segments
from .shards import FORMATS, expand_shards


@dataclass
class SourceConfig:
    """One shard set in the mixture."""

    shards: str
    """Brace pattern (``data/caps-{000000..000009}.tar``), folder of ``.tar`` files, or one file."""
    kind: str
    """Sample format: caption, qa, interleaved or sketch."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""
    select: str | None = None
    """Keep only samples whose text members (``.json``, ``.txt``, ``.html``) match this
    regular expression, case-insensitive: ``"colou?r|red|teal"`` picks easy-VQA's colour
    questions. Samples left out are not counted as skipped."""

    def validate(self) -> None:
        if self.kind not in FORMATS:
            raise ValueError(f"source {self.shards}: kind must be one of {FORMATS}, got {self.kind!r}")
        if self.weight <= 0:
            raise ValueError(f"source {self.shards}: weight must be > 0, got {self.weight}")
        if self.select is not None:
            try:
                re.compile(self.select)
            except re.error as e:
                raise ValueError(f"source {self.shards}: select is not a regular expression: {e}") from None


def _selected(samples: Iterator[dict], pattern: str) -> Iterator[dict]:
    regex = re.compile(pattern, re.IGNORECASE)
    for sample in samples:
        text = " ".join(
            v.decode("utf-8", "replace")
            for k, v in sample.items()
            if k in ("json", "txt", "html") and isinstance(v, bytes)
        )
        if regex.search(text):
            yield sample


@dataclass
class LoaderConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 1000
    """Samples held for shuffling per source and worker (0: no shuffling)."""
    resampled: bool = False
    """Draw shards with replacement, endlessly; an epoch is then ``epoch_batches`` long."""
    epoch_batches: int | None = None
    """Batches per rank in an epoch (required when resampled; optional cap otherwise)."""
    mix: str = "batch"
    """``batch``: each batch comes from one source, drawn by weight (no padding of short
    question-answer samples up to long HTML pages); ``sample``: sources mix within a batch."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    drop_last: bool = True
    """Drop the last, smaller batch of an epoch instead of yielding it."""
    seed: int = 0

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("the data config has no sources")
        for s in self.sources:
            s.validate()
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.mix not in ("batch", "sample"):
            raise ValueError(f"mix must be 'batch' or 'sample', got {self.mix!r}")
        if self.resampled and not self.epoch_batches:
            raise ValueError("resampled mode needs epoch_batches")


def _identity(urls):
    return urls


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """The batches of one rank; give it to a DataLoader with ``batch_size=None``."""

    def __init__(self, cfg: LoaderConfig, processor: Processor, rank: int | None = None, world_size: int | None = None):
        cfg.validate()
        self.cfg = cfg
        self.processor = processor
        default_rank, default_world = dist_info()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.epoch = 0
        self.urls = [expand_shards(s.shards) for s in cfg.sources]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------ per worker

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _raw_samples(self, urls: list[str], rng: random.Random, skipped: SkipCounter) -> Iterator[dict]:
        def count_and_continue(exn: Exception) -> bool:
            skipped["unreadable shard data"] += 1
            return True

        if self.cfg.resampled:

            def endless():
                while True:
                    yield rng.choice(urls)

            shard_iter = endless()
        else:
            shard_iter = iter(urls)
        for url in shard_iter:
            yield from wds.WebDataset(
                url,
                shardshuffle=False,
                nodesplitter=_identity,
                workersplitter=_identity,
                handler=count_and_continue,
                empty_check=False,
            )

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = sample
        rng.shuffle(buffer)
        yield from buffer

    def _source_urls(self, index: int, worker: int, workers: int) -> list[str]:
        urls = self.urls[index]
        if self.cfg.resampled:
            return urls
        mine = urls[self.rank :: self.world_size][worker::workers]
        if self.cfg.shuffle_buffer > 1:
            random.Random(f"{self.cfg.seed}-{self.epoch}-{index}-{self.rank}-{worker}").shuffle(mine)
        return mine

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        rng = random.Random(f"{self.cfg.seed}-{self.epoch}-{self.rank}-{worker}")
        skipped = SkipCounter()
        streams, weights = [], []
        for i, source in enumerate(self.cfg.sources):
            urls = self._source_urls(i, worker, workers)
            if urls:
                samples = self._raw_samples(urls, rng, skipped)
                if source.select:
                    samples = _selected(samples, source.select)
                stream = self._shuffled(samples, rng)
                streams.append((i, source.kind, stream))
                weights.append(source.weight)
        limit = math.inf
        if self.cfg.epoch_batches:
            limit = math.ceil(self.cfg.epoch_batches / workers)
        encoded, pixels, keys, batches = [], [], [], 0
        origins: set[int] = set()  # the sources in the batch being filled
        current = None
        while streams and batches < limit:
            if current is None or self.cfg.mix == "sample":
                current = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
            j = current
            source_index, kind, stream = streams[j]
            try:
                raw = next(stream)
            except StopIteration:
                del streams[j], weights[j]
                current = None
                continue
            try:
                example = decode_sample(raw, kind, self.cfg.max_pixels)
                ids, labels = self.processor.encode(example_segments(self.processor, example))
                n_images = sum(t == self.processor.image_token_id for t in ids)
                px = self.processor.transform_images(example.images)[:n_images]
            except SkipSample as e:
                skipped[e.reason] += 1
                continue
            except ValueError:
                skipped["unusable text"] += 1
                continue
            encoded.append((ids, labels))
            pixels.append(px)
            keys.append(raw.get("__key__", ""))
            origins.add(source_index)
            if len(encoded) == self.cfg.batch_size:
                yield self._batch(encoded, pixels, keys, skipped, origins)
                encoded, pixels, keys, batches = [], [], [], batches + 1
                origins, current = set(), None
        if encoded and not self.cfg.drop_last and batches < limit:
            yield self._batch(encoded, pixels, keys, skipped, origins)
        elif skipped:
            yield {"skipped": dict(skipped)}  # a final report with no samples

    def _batch(self, encoded, pixels, keys, skipped: SkipCounter, origins: set[int]) -> dict:
        batch = self.processor.collate(encoded, pixels)
        batch["keys"] = keys
        # The index of the one source the batch came from, or -1 if it mixes sources: the
        # trainer's time budget weighs each source's step time by its share of batches.
        batch["source"] = next(iter(origins)) if len(origins) == 1 else -1
        batch["skipped"] = dict(skipped)
        skipped.clear()
        return batch


def make_loader(
    cfg: LoaderConfig, processor: Processor, rank: int | None = None, world_size: int | None = None
) -> DataLoader:
    """A DataLoader over :class:`ShardStream`; batches come from ``cfg.num_workers`` workers."""
    stream = ShardStream(cfg, processor, rank, world_size)
    return DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False)


def is_report_only(batch: dict) -> bool:
    """True for the end-of-stream message that only carries skip counts."""
    return "input_ids" not in batch
