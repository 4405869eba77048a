"""Opening images safely: any PIL mode to RGB, limits on pixels, side and aspect ratio
checked from the header before decoding, and one clear error type for everything that
can go wrong."""

from __future__ import annotations

import io
import os
from typing import IO

from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
"""Image file extensions (lower case, no dot) that the tools take as images: folders
searched by ``vlm caption`` and ``vlm data folder``, and shard members read by the data
pipeline and ``vlm caption``, in this order of preference. PIL reads them all."""

DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_SIDE = 16384
"""Longest side accepted whatever the pixel count: image transforms resize to a square or
to a shortest side, so a 16,777,216 × 1 line (within the pixel limit) asks for gigabytes."""
MAX_ASPECT_RATIO = 50
"""Longest over shortest side. Panoramas and long page screenshots stay well below
(1280 × 20,000 is ~16:1); beyond it a square model input keeps nothing recognisable, and
the intermediate image of a resize grows with the ratio."""


class ImageError(ValueError):
    """An input that cannot be used as an image. ``reason`` says what for a person;
    ``kind`` is a short label to count: ``empty image``, ``file not found``, ``image too
    large``, ``image aspect ratio`` or ``corrupt image``."""

    def __init__(self, reason: str, source: str = "", kind: str | None = None):
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.kind = kind or reason


def has_image_ext(name: str | os.PathLike) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_EXTS` (any case)."""
    parts = str(name).rsplit(".", 1)
    return len(parts) == 2 and parts[1].lower() in IMAGE_EXTS


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency goes onto white, 16-bit is scaled down."""
    if image.mode == "RGB":
        return image
    import numpy as np  # only these conversions need it

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
        check_size(*image.size, max_pixels, name)  # from the header, before any pixel is decoded
        image.load()
        return to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found", name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image too large", name) from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError… for broken files
        message = "not a readable image (corrupt, truncated or another file type)"
        raise ImageError(message, name, "corrupt image") from None


def check_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "") -> None:
    """Raise :class:`ImageError` for a size that decoding or resizing would pay too much for."""
    size = f"{width}x{height}"
    if width * height > max_pixels:
        raise ImageError(f"image too large ({size} pixels, limit {max_pixels})", source, "image too large")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        message = f"image aspect ratio too extreme ({size}, limit {MAX_ASPECT_RATIO}:1)"
        raise ImageError(message, source, "image aspect ratio")
    if max(width, height) > MAX_SIDE:
        raise ImageError(f"image too large ({size}, longest side limit {MAX_SIDE})", source, "image too large")
