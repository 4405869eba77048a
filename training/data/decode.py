"""Turning raw shard samples into model examples, robustly.

Anything wrong with a sample (an image that is corrupt, truncated, too large or of an
odd mode that cannot be converted; a missing member; bad JSON; empty text) raises
:class:`SkipSample` with a short reason; the loader counts reasons and carries on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from vlm.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from vlm.processor import CAPTION_PROMPT, SKETCH_PROMPT, Processor, Segment

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is a short, countable label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Example:
    kind: str  # caption | qa | interleaved | sketch
    images: list[Image.Image]
    text: str = ""
    turns: list[tuple[str, str]] | None = None
    items: list[dict] | None = None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    try:
        return load_image(data, max_pixels)
    except ImageError as e:
        if e.reason == "empty image":
            raise SkipSample("empty image") from None
        raise SkipSample("image too large" if "too large" in e.reason else "corrupt image") from None


def _image_member(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SkipSample("missing image")


def _json(sample: dict) -> dict:
    if "json" not in sample:
        raise SkipSample("missing json")
    try:
        value = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad json") from None
    if not isinstance(value, dict):
        raise SkipSample("bad json")
    return value


def _text(data: bytes | None, what: str) -> str:
    if data is None:
        raise SkipSample(f"missing {what}")
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
                if name not in sample:
                    raise SkipSample("missing image")
                images.append(decode_image(sample[name], max_pixels))
        if not images or not any(str(i.get("text", "")).strip() for i in items):
            raise SkipSample("empty text")
        return Example("interleaved", images, items=items)
    raise ValueError(f"unknown sample format {kind!r}")


def example_segments(processor: Processor, ex: Example) -> list[Segment]:
    """The training text of an example in the model's prompt format."""
    chat = processor.uses_chat_template
    if ex.kind == "caption":
        return processor.chat_segments([(CAPTION_PROMPT, ex.text)]) if chat else processor.caption_segments(ex.text)
    if ex.kind == "sketch":
        return processor.chat_segments([(SKETCH_PROMPT, ex.text)])
    if ex.kind == "qa":
        return processor.chat_segments(ex.turns)
    parts, open_chunk = [], False
    for item in ex.items:
        if "image" in item:
            parts.append((processor.end_of_chunk_token if open_chunk else "") + processor.image_token)
            open_chunk = True
        else:
            parts.append(str(item["text"]))
    if open_chunk:
        parts.append(processor.end_of_chunk_token)
    return processor.interleaved_segments("".join(parts))


class SkipCounter(Counter):
    """Skipped samples by reason."""

    def summary(self) -> str:
        if not self:
            return "no samples skipped"
        return f"skipped {sum(self.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.items()))
