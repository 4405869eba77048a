"""Streaming batches from webdataset shards: split by node and worker, shuffled,
mixed from weighted sources, decoded robustly and tokenised in the worker processes.

Each batch is a dict of padded tensors (``input_ids``, ``attention_mask``, ``labels``
(B, S); ``images`` (B, T, C, H, W); with a prefix cache, ``prefix`` (B, S, D): the
cached hidden states entering the first cross-attention layer, see
:mod:`vlm_train.data.prefix_cache`; with a source's ``text_weight`` below 1,
``label_weights`` (B, S)), the samples' ``keys``, and ``skipped``: the
samples this worker skipped (or kept truncated) since its previous batch, by reason, so
the trainer can add them up and report them.

Nothing in the data stops the stream. Shards are read with :mod:`vlm.tario`, which checks
every declared size; damage is counted by reason. Any exception while decoding or
tokenising one sample is that sample's problem: it is counted (``decode error: KeyError``
where no more specific reason exists) and the sample skipped. Only failures of the run
itself stop it: MemoryError (a sample that would need an absurd allocation is refused
before allocating), KeyboardInterrupt, a bad configuration. In resampled mode, a source
that keeps giving nothing usable is dropped from the mixture with a warning rather than
drawn from forever.

A resumed run skips the batches it already trained on: ``set_epoch(epoch, skip_batches=n)``
makes each worker read, decode and tokenise them exactly as before (so every later draw
and skip decision is the same) but not transform their images, read their cached prefixes
or send them whole; they arrive as ``{"skip_only": True, ...}`` placeholders, which the
consumer counts and drops.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.processor import Processor
from vlm.tario import ShardError, iter_tar_samples

from ..config import LoaderConfig, SourceConfig  # defined beside TrainConfig, without torch, for `vlm train --help`
from .decode import (
    MAX_TEXT_BYTES,
    SkipCounter,
    decode_sample,
    example_segments,
    fit_tokens,
    skip_reason,
    text_weights,
)
from .prefix_cache import PrefixLookup
from .shards import as_raw, expand_shards

log = logging.getLogger(__name__)


def _matcher(pattern: str) -> Callable[[dict], bool]:
    regex = re.compile(pattern, re.IGNORECASE)

    def wanted(sample: dict) -> bool:
        # The start of a huge member is enough: the decoder refuses such a sample anyway.
        text = " ".join(
            v[:MAX_TEXT_BYTES].decode("utf-8", "replace")
            for k, v in sample.items()
            if k in ("json", "txt", "html") and isinstance(v, bytes)
        )
        return regex.search(text) is not None

    return wanted


class _Barren(Exception):
    """A resampled source gave no usable sample from too many shards in a row."""


@dataclass
class _ShardTally:
    url: str
    samples: int | None = None  # passed on to decoding; None while the shard is still read
    decoded: int = 0
    usable: bool = False


class _BarrenWatch:
    """Per source in resampled mode: raises :class:`_Barren` after ``limit`` distinct shards
    in a row end without a usable sample.

    A shard is judged once all its samples are decoded, in the order shards were opened:
    the shuffle buffer reads ahead, and while a shard's samples wait there, empty shards
    opened after it must not count as a run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.tallies: dict[int, _ShardTally] = {}  # by serial, in opening order
        self.serial = 0
        self.barren: set[str] = set()
        self.reasons = SkipCounter()  # why nothing was usable, since the last usable sample

    def opened(self, url: str) -> int:
        self.serial += 1
        self.tallies[self.serial] = _ShardTally(url)
        return self.serial

    def read(self, serial: int, samples: int) -> None:
        self.tallies[serial].samples = samples
        self._judge()

    def decoded(self, serial: int, reason: str | None) -> None:
        tally = self.tallies[serial]
        tally.decoded += 1
        if reason is None:
            tally.usable = True
            self.reasons.clear()
        else:
            self.reasons[reason] += 1
        self._judge()

    def _judge(self) -> None:
        while self.tallies:
            serial, tally = next(iter(self.tallies.items()))
            if tally.samples is None or tally.decoded < tally.samples:
                return
            del self.tallies[serial]
            if tally.usable:
                self.barren.clear()
                continue
            self.barren.add(tally.url)
            if len(self.barren) >= self.limit:
                raise _Barren


class _Group:
    """Full batches held for ``group_by_length``, sample by sample."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.encoded, self.pixels, self.keys, self.prefixes, self.origins = [], [], [], [], []

    def add(self, encoded, pixels, keys, prefixes, origin: int) -> None:
        self.encoded += encoded
        self.pixels += pixels
        self.keys += keys
        self.prefixes += prefixes
        self.origins += [origin] * len(keys)


@dataclass
class _Deferred:
    """A sample encoded without its image tensors (in a batch a resumed run skips, most likely)."""

    raw: dict
    source: SourceConfig


@dataclass
class _Source:
    index: int
    config: SourceConfig
    stream: Iterator[dict]
    watch: _BarrenWatch | None  # resampled mode only: a finite pass ends by itself


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """The batches of one rank; give it to a DataLoader with ``batch_size=None``."""

    def __init__(
        self,
        cfg: LoaderConfig,
        processor: Processor,
        rank: int | None = None,
        world_size: int | None = None,
        prefix: PrefixLookup | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.processor = processor
        self.prefix = prefix
        default_rank, default_world = dist_info()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.epoch = 0
        self.skip_batches = 0
        self.urls = [expand_shards(s.shards) for s in cfg.sources]
        self._pieces: dict[int, str] = {}

    def _piece(self, token: int) -> str:
        """A token id's text, decoded alone (cached)."""
        if token not in self._pieces:
            self._pieces[token] = self.processor.tokenizer.decode([token])
        return self._pieces[token]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The next iteration reads ``epoch``; its first ``skip_batches`` batches (a resumed
        run's, counted over all workers) are wanted only to be skipped."""
        self.epoch, self.skip_batches = epoch, skip_batches

    # ------------------------------------------------------------ per worker

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _raw_samples(
        self,
        source: SourceConfig,
        urls: list[str],
        rng: random.Random,
        skipped: SkipCounter,
        watch: _BarrenWatch | None,
    ) -> Iterator[dict]:
        """The source's samples that pass ``select``, each tagged with its shard's serial
        (``__shard__``); damaged members and shards are counted, never raised."""

        def damaged(reason: str) -> None:
            skipped[reason] += 1
            if watch:
                watch.reasons[reason] += 1

        wanted = _matcher(source.select) if source.select else None
        shards = (rng.choice(urls) for _ in itertools.count()) if self.cfg.resampled else iter(urls)
        for url in shards:
            serial = watch.opened(url) if watch else 0
            passed = left_out = 0
            try:
                for sample in iter_tar_samples(url):
                    if sample.problem:
                        damaged(sample.problem)
                        continue
                    raw = as_raw(sample)
                    if wanted is not None and not wanted(raw):
                        left_out += 1
                        continue
                    raw["__shard__"] = serial
                    raw["__shard_url__"] = url
                    passed += 1
                    yield raw
            except ShardError as e:
                damaged(e.reason)
            if watch:
                if left_out and not passed:
                    watch.reasons[f"no sample matches select {source.select!r}"] += 1
                watch.read(serial, passed)

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

    def _encode(
        self, raw: dict, source: SourceConfig, transform: bool = True
    ) -> tuple[list[int], list[int], list[torch.Tensor] | _Deferred, bool]:
        """``(ids, labels, pixels, truncated)`` of one sample, or an exception saying why not.
        ``transform=False``: the images are decoded and checked as the transform would, but
        not transformed; ``pixels`` is then a :class:`_Deferred` that :meth:`_batch` encodes
        again if the sample is trained on after all."""
        example = decode_sample(raw, source.kind, self.cfg.max_pixels)
        ids, labels = self.processor.encode(example_segments(self.processor, example))
        # The prefix cache builds its ids with this same path (prefix_cache.encode_for_cache).
        ids, labels, truncated = fit_tokens(ids, labels, source.max_tokens)
        # Only the images whose marker survived a cut are transformed and fed.
        n_images = sum(t == self.processor.image_token_id for t in ids)
        if transform:
            return ids, labels, self.processor.transform_images(example.images[:n_images]), truncated
        for j, image in enumerate(example.images[:n_images]):  # what Processor.transform_images could fail on
            if not isinstance(image, Image.Image):
                raise TypeError(f"image {j}: expected a PIL image, got {type(image).__name__}")
            image.convert("RGB")
        return ids, labels, _Deferred(raw, source), truncated

    def _dropped(self, source: _Source) -> str:
        """Names a barren source and why, in a warning now (and in the error if none is left)."""
        why = ", ".join(f"{k} {v}" for k, v in sorted(source.watch.reasons.items())) or "no samples"
        cfg = source.config
        what = f"{cfg.shards} ({cfg.kind}): no usable sample in {source.watch.limit} of its shards in a row ({why})"
        log.warning("data source %s dropped from the mixture", what)
        return what

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        rng = random.Random(f"{self.cfg.seed}-{self.epoch}-{self.rank}-{worker}")
        skipped = SkipCounter()
        sources: list[_Source] = []
        for i, config in enumerate(self.cfg.sources):
            urls = self._source_urls(i, worker, workers)
            if urls:
                watch = _BarrenWatch(min(self.cfg.barren_shards, len(set(urls)))) if self.cfg.resampled else None
                stream = self._shuffled(self._raw_samples(config, urls, rng, skipped, watch), rng)
                sources.append(_Source(i, config, stream, watch))
        limit = math.inf
        if self.cfg.epoch_batches:
            limit = math.ceil(self.cfg.epoch_batches / workers)
        # Batch k of the epoch comes from worker k % workers while all have batches left (the
        # DataLoader takes them in turn; one that has run out is passed over, so the others
        # give more of the first ones): each worker's first skip_batches // workers batches
        # are always among those skipped. Samples read meanwhile are not transformed; the
        # few of them that length grouping puts into later batches are encoded again there.
        skip_left = self.skip_batches // workers

        def batch(*parts) -> dict:
            nonlocal skip_left
            skip_only = skip_left > 0
            skip_left -= skip_only
            return self._batch(*parts, skip_only=skip_only)

        encoded, pixels, keys, prefixes, batches = [], [], [], [], 0
        origins: set[int] = set()  # the sources in the batch being filled
        groups: dict[int, _Group] = {}  # group_by_length: full batches held, by source (-1: mixed)
        dropped: list[str] = []
        current = None
        while sources and batches < limit:
            if current is None or self.cfg.mix == "sample":
                weights = [s.config.weight for s in sources]
                current = rng.choices(range(len(sources)), weights)[0] if len(sources) > 1 else 0
            source = sources[current]
            try:
                raw = next(source.stream)
            except (StopIteration, _Barren) as end:
                if isinstance(end, _Barren):
                    dropped.append(self._dropped(source))
                del sources[current]
                current = None
                continue
            reason = None
            try:
                ids, labels, px, truncated = self._encode(raw, source.config, transform=skip_left == 0)
            except MemoryError:
                raise
            except Exception as e:  # whatever one sample provokes is that sample's problem, not the run's
                reason = skip_reason(e)
            if source.watch is not None:
                try:
                    source.watch.decoded(raw["__shard__"], reason)
                except _Barren:
                    dropped.append(self._dropped(source))
                    del sources[current]
                    current = None
            if reason is not None:
                skipped[reason] += 1
                continue
            if truncated:
                skipped["truncated"] += 1
            if self.prefix is not None:  # read with its batch (a mismatch is the run's problem: it raises)
                prefixes.append((raw["__shard_url__"], source.index, raw["__key__"], ids))
            weights = None
            if source.config.text_weight != 1:
                weights = text_weights(labels, source.config.text_weight, self._piece)
            encoded.append((ids, labels, weights))
            pixels.append(px)
            keys.append(raw.get("__key__", ""))
            origins.add(source.index)
            if len(encoded) == self.cfg.batch_size:
                if self.cfg.group_by_length > 1:
                    origin = next(iter(origins)) if len(origins) == 1 else -1  # -1: a mixed batch
                    group = groups.setdefault(origin, _Group())
                    group.add(encoded, pixels, keys, prefixes, origin)
                    if len(group.keys) == self.cfg.batch_size * self.cfg.group_by_length:
                        yield from self._regrouped(group, rng, skipped, batch)
                else:
                    yield batch(encoded, pixels, keys, skipped, origins, prefixes)
                encoded, pixels, keys, prefixes, batches = [], [], [], [], batches + 1
                origins, current = set(), None
        for group in groups.values():  # the last, partly filled groups: whole batches still
            yield from self._regrouped(group, rng, skipped, batch)
        if dropped and not sources:
            raise RuntimeError("no usable samples from any data source: " + "; ".join(dropped))
        if encoded and not self.cfg.drop_last and batches < limit:
            yield batch(encoded, pixels, keys, skipped, origins, prefixes)
        elif skipped:
            yield {"skipped": dict(skipped)}  # a final report with no samples

    def _regrouped(self, group: _Group, rng: random.Random, skipped: SkipCounter, batch) -> Iterator[dict]:
        """The group's samples sorted by length, cut into batches (made by ``batch``, a
        :meth:`_batch`), in a random order; emptied."""
        order = sorted(range(len(group.keys)), key=lambda i: len(group.encoded[i][0]))
        size = self.cfg.batch_size
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            prefixes = [group.prefixes[i] for i in chunk] if group.prefixes else []
            yield batch(
                [group.encoded[i] for i in chunk],
                [group.pixels[i] for i in chunk],
                [group.keys[i] for i in chunk],
                skipped,
                {group.origins[i] for i in chunk},
                prefixes,
            )
        group.clear()

    def _batch(
        self, encoded, pixels, keys, skipped: SkipCounter, origins: set[int], prefixes=(), skip_only: bool = False
    ) -> dict:
        # The index of the one source the batch came from, or -1 if it mixes sources: the
        # trainer's time budget weighs each source's step time by its share of batches.
        source = next(iter(origins)) if len(origins) == 1 else -1
        if skip_only:  # a batch a resumed run has trained on: counted, not built
            batch = {"skip_only": True, "keys": keys, "source": source, "skipped": dict(skipped)}
            skipped.clear()
            return batch
        pixels = [self._encode(p.raw, p.source)[2] if isinstance(p, _Deferred) else p for p in pixels]
        batch = self.processor.collate([(ids, labels) for ids, labels, _ in encoded], pixels)
        if any(weights is not None for *_, weights in encoded):
            batch["label_weights"] = label_weights = torch.ones(batch["labels"].shape)
            for i, (*_, weights) in enumerate(encoded):
                if weights is not None:
                    label_weights[i, : len(weights)] = torch.tensor(weights)
        if prefixes:
            prefixes = [self.prefix.get(*p) for p in prefixes]
            first = prefixes[0]
            prefix = first.new_zeros(len(prefixes), batch["input_ids"].shape[1], first.shape[-1])  # (B, S, D)
            for i, p in enumerate(prefixes):
                prefix[i, : p.shape[0]] = p
            batch["prefix"] = prefix
        batch["keys"] = keys
        batch["source"] = source
        batch["skipped"] = dict(skipped)
        skipped.clear()
        return batch


def make_loader(
    cfg: LoaderConfig,
    processor: Processor,
    rank: int | None = None,
    world_size: int | None = None,
    prefix: PrefixLookup | None = None,
) -> DataLoader:
    """A DataLoader over :class:`ShardStream`; batches come from ``cfg.num_workers`` workers.
    With ``prefix``, each batch carries the cached prefix of its samples."""
    stream = ShardStream(cfg, processor, rank, world_size, prefix)
    return DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False)


def is_report_only(batch: dict) -> bool:
    """True for the end-of-stream message that only carries skip counts."""
    return "input_ids" not in batch and not batch.get("skip_only")
