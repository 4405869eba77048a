"""Synthetic shape scenes: coloured shapes on a plain background, with captions and QA pairs.

Some (colour, shape) combinations are held out of train and val and appear only in test,
so the test split measures whether a model composes attributes it has only seen apart.
Every sample draws from its own RNG seeded by ``(seed, split, index)``: sample ``i`` is
the same whatever ``count`` is, and the splits are independent streams.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: tuple[str, ...] = ("small", "large")

# A diagonal of the colour x shape grid: 5 of 30 combinations (17%), each shape once and
# five of the six colours once, so every colour and every shape keeps plenty of train data.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "star"), ("blue", "diamond"), ("yellow", "circle"), ("purple", "square")}
)
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_COMBOS: tuple[tuple[str, str], ...] = tuple(combo for combo in ALL_COMBOS if combo not in HELD_OUT)

BACKGROUND = (245, 245, 240)
# Radii as a fraction of the image side, so scenes look alike at any resolution.
_RADIUS = {"small": 0.08, "large": 0.14}
_GAP = 0.03  # minimum empty space between two objects, as a fraction of the side
_MAX_OBJECTS = 4


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; ``x``, ``y`` is its centre and ``radius`` its bounding half-size, in pixels."""

    color: str
    shape: str
    size: str
    x: int
    y: int
    radius: int

    @property
    def name(self) -> str:
        """``"red circle"``: unique within a scene, because a scene never repeats a combination."""
        return f"{self.color} {self.shape}"


@dataclass
class ShapeScene:
    key: str
    image: Image.Image
    objects: list[ShapeObject]
    caption: str
    qa: list[tuple[str, str]]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` lies relative to ``b`` along the axis that separates them most.

    Placement keeps objects at least a gap apart, so the dominant offset is always many
    pixels and the relation (and its opposite's falsity) is unambiguous.
    """
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def generate_scenes(split: str, count: int, seed: int = 0, image_size: int = 128) -> Iterator[ShapeScene]:
    """Yield ``count`` scenes of ``split`` (``"train"``, ``"val"`` or ``"test"``), deterministically.

    The split is checked at the call, not at the first ``next()``, so a typo fails where it is made.
    """
    check_split(split)
    return (scene_at(split, index, seed, image_size) for index in range(count))


def scene_at(split: str, index: int, seed: int = 0, image_size: int = 128) -> ShapeScene:
    """Scene ``index`` of ``split``: the same whichever other scenes are made, or in what order."""
    # A string seed goes through SHA-512, so it is stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"shapes/{seed}/{split}/{index}")
    return _scene(rng, split, f"shapes-{split}-{index:06d}", image_size)


def _scene(rng: random.Random, split: str, key: str, image_size: int) -> ShapeScene:
    objects = _place(rng, _combos(rng, split), image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return ShapeScene(key, image, objects, caption(objects), questions(rng, objects, split))


def _combos(rng: random.Random, split: str) -> list[tuple[str, str]]:
    n = rng.randint(1, _MAX_OBJECTS)
    if split != "test":
        return rng.sample(SEEN_COMBOS, n)
    # Test scenes always hold one unseen combination; the others may be seen or unseen.
    first = rng.choice(sorted(HELD_OUT))
    rest = rng.sample([c for c in ALL_COMBOS if c != first], n - 1)
    combos = [first, *rest]
    rng.shuffle(combos)
    return combos


def _place(rng: random.Random, combos: list[tuple[str, str]], image_size: int) -> list[ShapeObject]:
    gap = max(2, round(_GAP * image_size))
    while True:  # rejection sampling; with at most 4 objects it almost always succeeds first time
        objects: list[ShapeObject] = []
        for color, shape in combos:
            size = rng.choice(SIZES)
            radius = max(3, round(_RADIUS[size] * image_size))
            for _ in range(100):
                x = rng.randint(radius + gap, image_size - radius - gap)
                y = rng.randint(radius + gap, image_size - radius - gap)
                if all(math.hypot(x - o.x, y - o.y) >= radius + o.radius + gap for o in objects):
                    objects.append(ShapeObject(color, shape, size, x, y, radius))
                    break
            else:
                break
        if len(objects) == len(combos):
            return objects


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x, y, r, fill = obj.x, obj.y, obj.radius, PALETTE[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        h = round(r * 0.85)  # a full-radius square looks much bigger than the circle beside it
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_regular(x, y, r, 3), fill=fill)
    elif obj.shape == "star":
        points = [_polar(x, y, r if i % 2 == 0 else r * 0.45, i * math.pi / 5) for i in range(10)]
        draw.polygon(points, fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _polar(x: int, y: int, r: float, angle: float) -> tuple[float, float]:
    # Angle 0 points up, so triangles and stars stand on their base.
    return (x + r * math.sin(angle), y - r * math.cos(angle))


def _regular(x: int, y: int, r: float, sides: int) -> list[tuple[float, float]]:
    return [_polar(x, y, r, 2 * math.pi * i / sides) for i in range(sides)]


def caption(objects: list[ShapeObject]) -> str:
    """``"a small red circle"``, or a chain of relations that mentions every object once:
    ``"a small red circle left of a large blue square, and a small green star below the blue square"``."""

    def described(o: ShapeObject) -> str:
        return f"a {o.size} {o.name}"  # sizes are consonant-initial, so "a" is always right

    if len(objects) == 1:
        return described(objects[0])
    a, b = objects[0], objects[1]
    clauses = [f"{described(a)} {relation(a, b)} {described(b)}"]
    for prev, obj in zip(objects[1:], objects[2:]):
        clauses.append(f"{described(obj)} {relation(obj, prev)} the {prev.name}")
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1] if len(clauses) > 1 else clauses[0]


def questions(rng: random.Random, objects: list[ShapeObject], split: str) -> list[tuple[str, str]]:
    """Question/answer pairs whose single-word answers follow unambiguously from ``objects``."""
    qa = [("How many objects are there?", str(len(objects)))]
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    for o in objects:
        if shape_counts[o.shape] == 1:
            qa.append((f"What colour is the {o.shape}?", o.color))
        if color_counts[o.color] == 1:
            qa.append((f"What shape is the {o.color} object?", o.shape))
    sized = rng.choice(objects)
    qa.append((f"What size is the {sized.name}?", sized.size))

    present = {(o.color, o.shape) for o in objects}
    yes = rng.choice(objects)
    qa.append((f"Is there {_article(yes.color)} {yes.name}?", "yes"))
    # Train and val text never names a held-out combination, not even to deny it.
    pool = ALL_COMBOS if split == "test" else SEEN_COMBOS
    color, shape = rng.choice([c for c in pool if c not in present])
    qa.append((f"Is there {_article(color)} {color} {shape}?", "no"))

    if len(objects) >= 2:
        a, b = rng.sample(objects, 2)
        # Only the true dominant relation or its opposite: a diagonal neighbour is both
        # "left of" and "above", so asking about the other axis could be ambiguous.
        true = relation(a, b)
        asked = true if rng.random() < 0.5 else _OPPOSITE[true]
        qa.append((f"Is the {a.name} {asked} the {b.name}?", "yes" if asked == true else "no"))
    return qa


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
