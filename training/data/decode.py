"""Turning raw shard samples into model examples, robustly.

Anything wrong with a sample (an image that is corrupt, truncated, too large, of an
extreme shape or of an odd mode that cannot be converted; a missing member; bad or too
deeply nested JSON; empty or huge text; a prompt too long for the token cap) raises
:class:`SkipSample` with a short reason; the loader counts reasons and carries on.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from vlm.images import DEFAULT_MAX_PIXELS, IMAGE_EXTS, ImageError, load_image
from vlm.model import IGNORE_INDEX
from vlm.tasks import Example, for_kind

if TYPE_CHECKING:
    from PIL import Image

    from vlm.processor import Processor, Segment

MAX_TEXT_BYTES = 1024 * 1024
"""Largest text member (``.txt``, ``.json``, ``.html``) decoded. Samples are capped at a few
thousand tokens anyway (:attr:`SourceConfig.max_tokens`), a few tens of KB of text; a
member past this is not a sample but a mistake, and decoding and tokenising it would cost
hundreds of MB and seconds."""
NOT_SKIPS = frozenset({"truncated"})
"""Counted reasons whose sample was kept (shortened), not skipped."""


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is a short, countable label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    try:
        return load_image(data, max_pixels)
    except ImageError as e:
        raise SkipSample(e.kind) from None


def _image_member(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SkipSample("missing image")


def _json(sample: dict) -> dict:
    if "json" not in sample:
        raise SkipSample("missing json")
    if len(sample["json"]) > MAX_TEXT_BYTES:
        raise SkipSample("text too large")
    try:
        value = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError, RecursionError):  # [[[…]]] deeper than Python's stack
        raise SkipSample("bad json") from None
    if not isinstance(value, dict):
        raise SkipSample("bad json")
    return value


def _text(data: bytes | None, what: str) -> str:
    if data is None:
        raise SkipSample(f"missing {what}")
    if len(data) > MAX_TEXT_BYTES:
        raise SkipSample("text too large")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample(f"bad {what} encoding") from None
    if not text:
        raise SkipSample(f"empty {what}")
    return text


def decode_sample(sample: dict, kind: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Example:
    """A raw webdataset sample (``{"__key__", ext: bytes}``) of format ``kind`` → :class:`Example`."""
    if kind == "caption":
        return Example(
            "caption", [decode_image(_image_member(sample), max_pixels)], text=_text(sample.get("txt"), "text")
        )
    if kind == "sketch":
        return Example(
            "sketch", [decode_image(_image_member(sample), max_pixels)], text=_text(sample.get("html"), "html")
        )
    if kind == "qa":
        meta = _json(sample)
        turns = meta.get("turns")
        ok = isinstance(turns, list) and turns and all(isinstance(t, list | tuple) and len(t) == 2 for t in turns)
        if not ok or not all(isinstance(x, str) and x.strip() for t in turns for x in t):
            raise SkipSample("bad turns")
        return Example("qa", [decode_image(_image_member(sample), max_pixels)], turns=[(q, a) for q, a in turns])
    if kind == "interleaved":
        items = _json(sample).get("items")
        if not isinstance(items, list) or not items:
            raise SkipSample("bad items")
        images = []
        for item in items:
            if not isinstance(item, dict) or not ({"text", "image"} & set(item)):
                raise SkipSample("bad items")
            if "image" in item:
                name = str(item["image"])
                if not isinstance(sample.get(name), bytes):
                    # Only a member: "__key__" or "__url__" would be read as a path on this machine.
                    raise SkipSample("missing image")
                images.append(decode_image(sample[name], max_pixels))
        if not images or not any(str(i.get("text", "")).strip() for i in items):
            raise SkipSample("empty text")
        return Example("interleaved", images, items=items)
    raise ValueError(f"unknown sample format {kind!r}")


def example_segments(processor: Processor, ex: Example) -> list[Segment]:
    """The training text of an example in the model's prompt format: its task's
    (:mod:`vlm.tasks`), which also gives the same prompt to ``vlm eval`` and the apps."""
    return for_kind(ex.kind).segments(processor, ex)


def fit_tokens(ids: list[int], labels: list[int], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """Cut one tokenised sample to ``max_tokens``: ``(ids, labels, truncated)``.

    The end goes: trained text loses its tail, which still teaches everything before it.
    The untrained start (prompt, image markers) cannot be cut without making the sample
    meaningless, so when it leaves no trained token within the cap the sample is skipped
    (``too long``). A cut never ends on untrained tokens: those would teach nothing."""
    if len(ids) <= max_tokens:
        return ids, labels, False
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if first >= max_tokens:
        raise SkipSample("too long")
    ids, labels = ids[:max_tokens], labels[:max_tokens]
    while labels[-1] == IGNORE_INDEX:
        ids.pop()
        labels.pop()
    return ids, labels, True


def inside_markup(pieces: Iterable[str]) -> list[bool]:
    """For each token's text, in order from outside any tag: whether it lies inside
    ``<...>`` (a token that opens or closes a tag counts as inside)."""
    out, inside = [], False
    for piece in pieces:
        out.append(inside or "<" in piece or ">" in piece)
        for ch in piece:
            if ch in "<>":
                inside = ch == "<"
    return out


def text_weights(labels: list[int], weight: float, piece: Callable[[int], str]) -> list[float]:
    """Per position of ``labels``: ``weight`` for a trained token outside ``<...>``, else 1.
    ``piece`` gives a token id's text (its tokenizer's decoding of it alone)."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    out = [1.0] * len(labels)
    for i, markup in zip(trained, inside_markup(piece(labels[i]) for i in trained)):
        if not markup:
            out[i] = weight
    return out


def skip_reason(error: Exception) -> str:
    """The countable reason for any exception raised by one sample's decoding or tokenising."""
    if isinstance(error, SkipSample):
        return error.reason
    if isinstance(error, ValueError):  # the processor's refusals (e.g. a chat template that fails on the text)
        return "unusable text"
    return f"decode error: {type(error).__name__}"


class SkipCounter(Counter):
    """Samples by the reason they were skipped, plus the kept-but-shortened ones
    (:data:`NOT_SKIPS`, e.g. ``truncated``), which are reported apart."""

    def skipped(self) -> int:
        return sum(v for k, v in self.items() if k not in NOT_SKIPS)

    def summary(self) -> str:
        skips = ", ".join(f"{k} {v}" for k, v in sorted(self.items()) if k not in NOT_SKIPS and v)
        text = f"skipped {self.skipped()}: {skips}" if skips else "no samples skipped"
        return text + "".join(f"; kept {v} {k}" for k, v in sorted(self.items()) if k in NOT_SKIPS and v)
