"""Opening images safely: any PIL mode to RGB, a pixel limit checked before decoding,
and one clear error type for everything that can go wrong."""

from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An input that cannot be used as an image; ``reason`` is a short label."""

    def __init__(self, reason: str, source: str = ""):
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency goes onto white, 16-bit is scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        return Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: bytes | str | os.PathLike | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image from bytes, a path or a file object, or :class:`ImageError`."""
    name = str(source) if isinstance(source, str | os.PathLike) else getattr(source, "name", "")
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty image")
        source = io.BytesIO(source)
    try:
        image = Image.open(source)
        width, height = image.size  # from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise ImageError(f"image too large ({width}x{height} pixels, limit {max_pixels})", name)
        image.load()
        return to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found", name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image too large", name) from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError… for broken files
        raise ImageError("not a readable image (corrupt, truncated or another file type)", name) from None
