"""How a sketch is drawn: pen, lettering, spacing, and paper photographed or scanned.

People draw a layout with other pens, other handwriting and other spacing than one
renderer, and photograph the paper with a phone. ``SketchStyle()`` is the original
renderer (its sketches are pixel-identical to those of the shards built before styles
existed); ``random_style`` draws the variety the training data gets; ``HELD_OUT`` are
named styles kept out of training (each at or past the edge of the training ranges) to
report how a model does on sketches drawn differently.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class SketchStyle:
    pen: float = 1.0
    """Stroke width, as a multiple of the original pen's."""
    wobble: float = 1.0
    """How much strokes bow and jitter, as a multiple of the original hand's."""
    ink: tuple[int, int, int] | None = None
    """Ink colour; None draws one of the original four (pencil, pen, blue biro, brown)."""
    slant: float = 0.0
    """Lettering shear (x shift per pixel of height); with ``jitter`` 0 and no slant, letters are printed."""
    jitter: float = 0.0
    """Handwriting: each letter is placed, sized and spaced with this much randomness (pixels)."""
    spacing: float = 1.0
    """Gaps between blocks, as a multiple of the original's."""
    zoom: float = 1.0
    """Drawing size on the paper (1: the layout fills the width)."""
    photo: float = 0.0
    """0: a clean scan; up to 1: a phone photo (tinted paper, shading, tilt, blur, noise, JPEG)."""

    @property
    def lettered(self) -> bool:
        return bool(self.slant or self.jitter)


INKS = ((25, 25, 25), (40, 40, 60), (20, 35, 110), (55, 45, 40), (150, 30, 30), (30, 100, 50), (95, 95, 95))

HELD_OUT = {
    "marker": SketchStyle(pen=2.4, wobble=1.8, ink=(10, 10, 10)),
    "handwriting": SketchStyle(slant=0.24, jitter=2.2, ink=(20, 35, 110)),
    "loose": SketchStyle(spacing=1.8, zoom=0.7),
    "photo": SketchStyle(photo=1.0),
}


def random_style(rng: random.Random) -> SketchStyle:
    """A style for one training sketch: a third drawn as the original, the rest varied."""
    if rng.random() < 1 / 3:
        return SketchStyle()
    return SketchStyle(
        pen=rng.uniform(0.7, 2.0),
        wobble=rng.uniform(0.5, 1.6),
        ink=rng.choice(INKS),
        slant=rng.uniform(-0.18, 0.18) if rng.random() < 0.5 else 0.0,
        jitter=rng.uniform(0.0, 1.8) if rng.random() < 0.5 else 0.0,
        spacing=rng.uniform(0.6, 1.5),
        zoom=rng.uniform(0.8, 1.0),
        photo=rng.uniform(0.2, 0.8) if rng.random() < 0.5 else 0.0,
    )


def fit_on_paper(drawing: Image.Image, size: tuple[int, int], zoom: float, rng: random.Random) -> Image.Image:
    """``drawing`` (possibly taller than the paper) scaled to fit ``size`` at ``zoom``, placed at a random offset."""
    scale = min(size[0] / drawing.width, size[1] / drawing.height) * zoom
    if scale == 1.0 and drawing.size == size:
        return drawing
    w, h = max(1, round(drawing.width * scale)), max(1, round(drawing.height * scale))
    paper = Image.new("RGB", size, (255, 255, 255))
    x, y = rng.randint(0, size[0] - w), rng.randint(0, max(0, (size[1] - h) // 3))  # drawings start near the top
    paper.paste(drawing.resize((w, h), Image.Resampling.LANCZOS), (x, y))
    return paper


def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    # PIL's PERSPECTIVE maps each output point to an input point: solve for the 8 coefficients.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float)).tolist()


def photograph(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """``image`` as a phone would photograph the paper, ``strength`` in (0, 1]."""
    w, h = image.size
    # A tilted camera a little further away: each corner of the paper moves inwards by 0 to
    # 10 % of the side, so the whole sheet stays in the picture with the table around it.
    tilt = 0.05 * strength
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    inward = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    moved = [
        (x + sx * (tilt + rng.uniform(-tilt, tilt)) * w, y + sy * (tilt + rng.uniform(-tilt, tilt)) * h)
        for (x, y), (sx, sy) in zip(corners, inward)
    ]
    table = (150, 140, 125)  # what shows around the paper
    image = image.transform(
        image.size, Image.Transform.PERSPECTIVE, _perspective_coeffs(corners, moved), Image.Resampling.BICUBIC,
        fillcolor=table,
    )  # fmt: skip
    arr = np.asarray(image, dtype=np.float32)
    # Warm paper and uneven light: a tint and a linear fall-off in a random direction.
    tint = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.85, 0.97)], np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5)) + 0.5  # 0..1 across the page
    light = 1.0 - 0.35 * strength * rng.uniform(0.5, 1.0) * ramp
    arr = arr * tint * light[..., None]
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    arr += noise_rng.normal(0.0, 8.0 * strength, arr.shape).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(radius=0.3 + 0.9 * strength * rng.random()))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(85 - 50 * strength * rng.random()))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
