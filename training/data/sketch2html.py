"""Synthetic sketch-to-HTML pairs: one page layout gives compact body HTML and a wireframe sketch.

Canonical HTML (the training target, so there is exactly one way to write a layout):
no whitespace between tags and no indentation; lowercase tags; the only attributes are
``class`` on sections and cards and ``alt`` on images, double-quoted; void elements are
written ``<img alt="photo">`` and ``<input>`` with no closing slash; text is escaped with
``html.escape``. The body is ``[<header>][<nav>]<main>content blocks</main>[<footer>]``.

The sketch draws the same blocks top to bottom (cards and columns left to right) with a
wobbly pen. Short labels (titles, headings, links, buttons, fields, list items, alt texts)
are written in a real font, and the target repeats them as drawn. Paragraphs are drawn as
squiggles, which show how long a paragraph is and nothing of what it says, so the target
never asks the model to invent sentences: a paragraph drawn as n lines of width w is the
first words of lorem ipsum, as many as n such lines hold (``placeholder``), text a
reader recognises at once as a placeholder to fill in.
"""

from __future__ import annotations

import html
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache

from PIL import Image, ImageDraw, ImageFont

from vlm.html import STYLESHEET, document  # noqa: F401 (the page shell lives with the apps)

from .shapes import check_split
from .sketch_style import HELD_OUT, SketchStyle, fit_on_paper, photograph, random_style

SKETCH_SIZE = (512, 512)  # square, because the image towers resize to a square without cropping
MAX_HTML_CHARS = 900  # about 300 BPE tokens: longer targets cost more than they teach
MARGIN, GAP = 16, 14
INNER = SKETCH_SIZE[0] - 2 * MARGIN

TITLES = ("Acme", "Green Cafe", "Pixel Labs", "Blue Harbor", "Sunny Farm", "Tiny Books", "Q&A Hub", "Bright Days")
LINKS = ("Home", "About", "Blog", "Shop", "Contact", "Pricing", "Help", "Docs", "Team", "News", "Jobs", "Q&A")
HEADINGS = ("About us", "Our work", "Welcome", "Latest news", "Get started", "Features", "Tips & tricks",
            "Our team", "Pricing", "Contact us", "Why us", "Services", "Hello there", "New today")  # fmt: skip
CARD_HEADINGS = ("Fast", "Simple", "Secure", "Support", "Design", "Travel", "Music", "Recipes", "Basic", "Pro")
BUTTONS = ("Sign up", "Learn more", "Buy now", "Join", "Read more", "Start", "Download", "Subscribe", "Try it")
CARD_BUTTONS = ("More", "Open", "Buy", "Join", "View", "Go")
FIELDS = ("Name", "Email", "Phone", "City", "Message", "Password", "Username")
SUBMITS = ("Submit", "Send", "Sign in", "Register")
ITEMS = ("Fast", "Free", "Simple", "Secure", "Open", "Friendly", "Modern", "Local", "Fresh", "Quiet", "Bright", "Safe")
ALTS = ("photo", "logo", "chart", "map", "banner", "avatar")
FOOTERS = ("Made with care", "All rights reserved", "Contact us", "Follow us", "Thanks for visiting")
# A paragraph's target text: the start of the classic placeholder, as many words as its drawn
# lines hold at one word per 12 characters of line (so a wide line holds more words than a
# card's; a short placeholder keeps the target cheap to train on).
LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi ut aliquip ex "
    "ea commodo consequat"
).split()
# A tiny sentence grammar. It only sets how long a drawn paragraph is (its line count and
# how far its last line runs); drawing lengths from it keeps every sketch, and the random
# draws of every layout, exactly as in the shards built before placeholders.
SUBJECTS = ("We", "You", "Our friends", "People", "Many teams", "Our kids")
VERBS = ("make", "build", "share", "sell", "find", "love", "grow", "plan", "cook", "write")
ADJECTIVES = ("simple", "fresh", "bright", "small", "good", "new", "friendly", "quiet", "clean", "warm")
NOUNS = ("tools", "books", "ideas", "meals", "songs", "games", "plans", "places", "gardens", "maps")
TAILS = ("every day", "for small teams", "in the city", "near home", "with care", "for everyone", "at night",
         "all year", "for you")  # fmt: skip

# kind -> tag of its element; a heading's tag carries its level instead.
_TAGS = {"header": "header", "nav": "nav", "paragraph": "p", "image": "img", "button": "button", "form": "form",
         "list": "ul", "row": "section", "card": "div", "columns": "section", "column": "div", "footer": "footer"}  # fmt: skip
_CLASSES = {"row": "row", "card": "card", "columns": "cols"}
_CHROME = ("header", "nav", "footer")  # outside <main>
_CONTENT_WEIGHTS = {"heading": 3, "paragraph": 3, "image": 2, "button": 1.5, "form": 1, "list": 1.5, "row": 1.5,
                    "columns": 1}  # fmt: skip


@dataclass(frozen=True)
class Block:
    """One node of a page layout.

    ``text`` is the title, heading, paragraph, label, alt text or footer text; ``items`` the
    nav links, list items or form field labels; ``children`` the cards of a row, the columns
    of a ``columns`` block, or a card's / column's own blocks.
    """

    kind: str
    text: str = ""
    items: tuple[str, ...] = ()
    children: tuple[Block, ...] = ()
    level: int = 0  # headings only: 1, 2, or 3 inside cards
    length: int = 0  # paragraphs only: drawn length in characters (line count, last line's reach)

    @property
    def tag(self) -> str:
        return f"h{self.level}" if self.kind == "heading" else _TAGS[self.kind]

    @property
    def css_class(self) -> str | None:
        return _CLASSES.get(self.kind)


@dataclass
class SketchPage:
    key: str
    layout: tuple[Block, ...]  # top-level blocks in page order; the html's <main> is implied
    html: str
    sketch: Image.Image


# ---------------------------------------------------------------- HTML


def render_html(layout: Sequence[Block]) -> str:
    """The canonical compact body HTML of a layout (see the module docstring)."""
    parts: list[str] = []
    in_main = False
    for block in layout:
        if block.kind not in _CHROME and not in_main:
            parts.append("<main>")
            in_main = True
        elif block.kind == "footer" and in_main:
            parts.append("</main>")
            in_main = False
        parts.append(_element(block))
    if in_main:
        parts.append("</main>")
    return "".join(parts)


def _element(b: Block) -> str:
    t = html.escape(b.text)
    if b.kind == "header":
        return f"<header><h1>{t}</h1></header>"
    if b.kind == "nav":
        return "<nav>" + "".join(f"<a>{html.escape(i)}</a>" for i in b.items) + "</nav>"
    if b.kind == "image":
        return f'<img alt="{t}">'
    if b.kind == "form":
        fields = "".join(f"<label>{html.escape(i)}<input></label>" for i in b.items)
        return f"<form>{fields}<button>{t}</button></form>"
    if b.kind == "list":
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>"
    cls = f' class="{b.css_class}"' if b.css_class else ""
    inner = "".join(_element(c) for c in b.children) if b.children else t
    return f"<{b.tag}{cls}>{inner}</{b.tag}>"


def generate_pages(split: str, count: int, seed: int = 0) -> Iterator[SketchPage]:
    """Yield ``count`` pages of ``split`` (``"train"``, ``"val"`` or ``"test"``), deterministically.

    Each page has its own RNG seeded by ``(seed, split, index)``, as in ``shapes``.
    """
    check_split(split)
    return (page_at(split, index, seed) for index in range(count))


STYLES = ("plain", "varied", *HELD_OUT)


def page_at(split: str, index: int, seed: int = 0, style: str = "plain") -> SketchPage:
    """Page ``index`` of ``split``: the same whichever other pages are made, or in what order.

    ``style``: ``plain`` (the original renderer), ``varied`` (a random pen, lettering,
    spacing and photo per page, as for training) or one of the held-out styles
    (``sketch_style.HELD_OUT``). The layout and the HTML do not depend on the style.
    """
    if style not in STYLES:
        raise ValueError(f"unknown sketch style {style!r}; choose from {', '.join(STYLES)}")
    rng = random.Random(f"sketch2html/{seed}/{split}/{index}")
    layout = tuple(_with_placeholder(b, INNER) for b in _layout(rng))
    if style == "varied":  # its own RNG, so layouts and the other draws stay as in plain
        drawn = random_style(random.Random(f"sketch2html-style/{seed}/{split}/{index}"))
    else:
        drawn = HELD_OUT.get(style, SketchStyle())
    return SketchPage(f"sketch-{split}-{index:06d}", layout, render_html(layout), draw_sketch(layout, rng, drawn))


def _layout(rng: random.Random) -> tuple[Block, ...]:
    while True:  # retry the rare page that ends up with too few blocks
        top = []
        if rng.random() < 0.75:
            top.append(Block("header", rng.choice(TITLES)))
        if rng.random() < 0.5:
            top.append(Block("nav", items=tuple(rng.sample(LINKS, rng.randint(2, 5)))))
        bottom = [Block("footer", rng.choice(FOOTERS))] if rng.random() < 0.5 else []
        wanted = max(2, rng.randint(3, 8) - len(top) - len(bottom))
        content: list[Block] = []
        for _ in range(wanted):
            for _attempt in range(6):  # a block that does not fit is replaced by another draw
                block = _content_block(rng)
                if content and block.kind == content[-1].kind:
                    continue  # two paragraphs (or lists) in a row would blur together in the sketch
                if _fits([*top, *content, block, *bottom]):
                    content.append(block)
                    break
        layout = (*top, *content, *bottom)
        if len(content) >= 2 and len(layout) >= 3:
            return layout


def _fits(layout: Sequence[Block]) -> bool:
    height = sum(_height(b, INNER) for b in layout) + GAP * (len(layout) - 1)
    return height <= SKETCH_SIZE[1] - 2 * MARGIN and len(render_html(layout)) <= MAX_HTML_CHARS


def placeholder(lines: int, width: int) -> str:
    """The target text of a paragraph drawn as ``lines`` squiggle lines ``width`` pixels wide."""
    count = lines * max(1, _line_chars(width) // 12)
    words = [LOREM[i % len(LOREM)] for i in range(count)]
    return " ".join(words).capitalize() + "."


def _with_placeholder(b: Block, width: int) -> Block:
    """``b`` with each paragraph's text set from the lines it is drawn with at ``width``."""
    if b.kind == "paragraph":
        return replace(b, text=placeholder(_text_lines(b.length, width), width))
    if not b.children:
        return b
    inner = _child_width(b, width) if b.kind in ("row", "columns") else width - 16 if b.kind == "card" else width
    return replace(b, children=tuple(_with_placeholder(c, inner) for c in b.children))


def _drawn_paragraph(text: str) -> Block:
    # The sentence only sizes the drawing (and, through _fits, the layout); the target
    # text is set from the drawing in _with_placeholder.
    return Block("paragraph", text, length=len(text))


def _sentence(rng: random.Random, short: bool = False) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(NOUNS))
    if not short and rng.random() < 0.7:
        words.append(rng.choice(TAILS))
    return " ".join(words) + "."


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, sentences)))


def _content_block(rng: random.Random) -> Block:
    kind = rng.choices(list(_CONTENT_WEIGHTS), weights=list(_CONTENT_WEIGHTS.values()))[0]
    if kind == "row":
        with_text, with_button = rng.random() < 0.7, rng.random() < 0.6  # cards in a row look alike
        cards = []
        for heading in rng.sample(CARD_HEADINGS, rng.randint(2, 4)):
            parts = [Block("heading", heading, level=3)]
            if with_text:
                parts.append(_drawn_paragraph(_sentence(rng, short=True)))
            if with_button:
                parts.append(Block("button", rng.choice(CARD_BUTTONS)))
            cards.append(Block("card", children=tuple(parts)))
        return Block("row", children=tuple(cards))
    if kind == "columns":
        columns = []
        for _ in range(rng.randint(2, 3)):
            kinds = rng.choice((("heading", "paragraph"), ("image",), ("paragraph",), ("list",), ("heading", "list"),
                                ("image", "button"), ("paragraph", "button")))  # fmt: skip
            columns.append(Block("column", children=tuple(_simple(rng, k, level=2, column=True) for k in kinds)))
        return Block("columns", children=tuple(columns))
    if kind == "form":
        return Block("form", rng.choice(SUBMITS), items=tuple(rng.sample(FIELDS, rng.randint(1, 3))))
    return _simple(rng, kind, level=rng.choice((1, 2)), column=False)


def _simple(rng: random.Random, kind: str, level: int, column: bool) -> Block:
    if kind == "heading":
        return Block("heading", rng.choice(CARD_HEADINGS if column else HEADINGS), level=level)
    if kind == "paragraph":
        return _drawn_paragraph(_paragraph(rng, 1 if column else 3))
    if kind == "image":
        return Block("image", rng.choice(ALTS))
    if kind == "button":
        return Block("button", rng.choice(CARD_BUTTONS if column else BUTTONS))
    if kind == "list":
        return Block("list", items=tuple(rng.sample(ITEMS, rng.randint(2, 4 if column else 5))))
    raise ValueError(f"unknown block kind {kind!r}")


# ---------------------------------------------------------------- sketch geometry

_LINE = 14  # pitch of squiggle lines
_FONT = {"title": 26, "h1": 28, "h2": 21, "h3": 17, "label": 17, "small": 14}
_INPUT_ROW, _BUTTON_H, _CARD_BUTTON_H, _ITEM_H = 38, 36, 28, 26
_FIXED_HEIGHTS = {"header": 52, "nav": 36, "footer": 36}


def _wide(width: int) -> bool:
    """Whether a block spans the page: buttons, images and lists draw bigger there than in a card or column."""
    return width >= INNER


def _line_chars(width: int) -> int:
    return max(8, width // 8)  # about 8 px a character of real text


def _text_lines(length: int, width: int) -> int:
    """Squiggle lines of a paragraph ``length`` characters long: a longer one draws more."""
    return max(1, math.ceil(length / _line_chars(width)))


def _height(b: Block, width: int) -> int:
    """Sketch height of a block; the generator uses it to keep every page on the canvas."""
    if b.kind in _FIXED_HEIGHTS:
        return _FIXED_HEIGHTS[b.kind]
    if b.kind == "heading":
        return {1: 38, 2: 30, 3: 24}[b.level]
    if b.kind == "paragraph":
        return _text_lines(b.length, width) * _LINE + 4
    if b.kind == "image":
        return 100 if _wide(width) else 70
    if b.kind == "button":
        return _BUTTON_H if _wide(width) else _CARD_BUTTON_H
    if b.kind == "form":
        return 12 + len(b.items) * _INPUT_ROW + _BUTTON_H + 12
    if b.kind == "list":
        return len(b.items) * _ITEM_H
    if b.kind in ("card", "column"):
        inner = width - 16 if b.kind == "card" else width
        pad = 20 if b.kind == "card" else 0
        return pad + sum(_height(c, inner) for c in b.children) + 6 * (len(b.children) - 1)
    if b.kind in ("row", "columns"):
        return max(_height(c, _child_width(b, width)) for c in b.children)
    raise ValueError(f"unknown block kind {b.kind!r}")


def _child_width(b: Block, width: int) -> int:
    gap = 12 if b.kind == "row" else 20
    return (width - gap * (len(b.children) - 1)) // len(b.children)


# ---------------------------------------------------------------- sketch drawing


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


class _Pen:
    """Draws like a quick hand: strokes bow and wobble, box corners overshoot."""

    def __init__(self, image: Image.Image, rng: random.Random, ink: tuple[int, int, int], style: SketchStyle) -> None:
        self.image, self.draw, self.rng, self.ink, self.style = image, ImageDraw.Draw(image), rng, ink, style

    def stroke(self, points: Sequence[tuple[float, float]], width: int = 2) -> None:
        width = max(1, round(width * self.style.pen))
        self.draw.line(list(points), fill=self.ink, width=width, joint="curve")

    def line(self, x0: float, y0: float, x1: float, y1: float, width: int = 2) -> None:
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        nx, ny = -(y1 - y0) / length, (x1 - x0) / length
        wobble = self.style.wobble
        bow, n = self.rng.uniform(-2.0, 2.0) * wobble, max(2, int(length // 18))
        points = []
        for i in range(n + 1):
            t = i / n
            off = bow * math.sin(math.pi * t) + self.rng.uniform(-0.8, 0.8) * wobble
            points.append((x0 + (x1 - x0) * t + nx * off, y0 + (y1 - y0) * t + ny * off))
        self.stroke(points, width)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> None:
        o = self.rng.uniform
        self.line(x0 - o(0, 3), y0, x1 + o(0, 3), y0 + o(-1, 1))
        self.line(x1, y0 - o(0, 3), x1 + o(-1, 1), y1 + o(0, 3))
        self.line(x1 + o(0, 3), y1, x0 - o(0, 3), y1 + o(-1, 1))
        self.line(x0, y1 + o(0, 3), x0 + o(-1, 1), y0 - o(0, 3))

    def rounded(self, x0: float, y0: float, x1: float, y1: float, r: float = 8) -> None:
        corners = ((x1 - r, y0 + r, -90), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180))
        points = []
        for cx, cy, start in corners:
            for step in range(0, 91, 15):
                a = math.radians(start + step)
                points.append((cx + r * math.cos(a) + self.rng.uniform(-0.7, 0.7), cy + r * math.sin(a)))
        self.stroke([*points, points[0]])

    def squiggle(self, x0: float, y: float, x1: float) -> None:
        amp, freq, phase = self.rng.uniform(1.5, 3.0), self.rng.uniform(0.25, 0.4), self.rng.uniform(0, 6.3)
        self.stroke([(x, y + amp * math.sin(phase + freq * (x - x0))) for x in range(int(x0), int(x1) + 1, 3)], 1)

    def text(self, x: float, y: float, text: str, size: int) -> float:
        """Write ``text`` with its top-left near ``x, y``; returns its width."""
        font = _font(size)
        x, y = x + self.rng.uniform(-1, 1), y + self.rng.uniform(-1, 1)
        if self.style.lettered:
            return self._handwrite(x, y, text, size)
        self.draw.text((x, y), text, fill=self.ink, font=font)
        return font.getlength(text)

    def _handwrite(self, x: float, y: float, text: str, size: int) -> float:
        """Letters one by one, each a little off in place, size and spacing, then slanted."""
        u, jitter = self.rng.uniform, self.style.jitter
        pad = size
        mask = Image.new("L", (int(_font(size).getlength(text) * 1.4) + 2 * pad, 2 * size + 2 * pad), 0)
        draw, cx = ImageDraw.Draw(mask), float(pad)
        for ch in text:
            font = _font(max(8, round(size * (1 + 0.04 * jitter * u(-1, 1)))))
            draw.text((cx + 0.3 * jitter * u(-1, 1), pad + jitter * u(-1, 1)), ch, fill=255, font=font)
            cx += font.getlength(ch) * (1 + 0.05 * jitter * u(-0.5, 1))
        base = pad + size  # the baseline stays put; letters above it lean by the slant
        slant = self.style.slant
        mask = mask.transform(mask.size, Image.Transform.AFFINE, (1, slant, -slant * base, 0, 1, 0))
        self.image.paste(self.ink, (round(x) - pad, round(y) - pad), mask)
        return cx - pad


def draw_sketch(layout: Sequence[Block], rng: random.Random, style: SketchStyle | None = None) -> Image.Image:
    """A hand-drawn-looking wireframe of ``layout`` in ``style``; ``rng`` supplies the wobble."""
    style = style or SketchStyle()
    gap = round(GAP * style.spacing)
    height = 2 * MARGIN + sum(_height(b, INNER) for b in layout) + gap * (len(layout) - 1)
    # Wide spacing can run past the paper: draw on a taller sheet, then shrink it to fit.
    image = Image.new("RGB", (SKETCH_SIZE[0], max(SKETCH_SIZE[1], height)), (255, 255, 255))
    inks = ((25, 25, 25), (40, 40, 60), (20, 35, 110), (55, 45, 40))  # pencil, pen, blue biro, brown
    ink = rng.choice(inks)
    pen = _Pen(image, rng, style.ink or ink, style)
    y = MARGIN
    for block in layout:
        _draw(pen, block, MARGIN, y, INNER)
        y += _height(block, INNER) + gap
    image = fit_on_paper(image, SKETCH_SIZE, style.zoom, rng)
    return photograph(image, style.photo, rng) if style.photo else image


def _draw(pen: _Pen, b: Block, x: int, y: int, w: int, h: int | None = None) -> None:
    h = h or _height(b, w)
    if b.kind == "header":
        pen.box(x, y, x + w, y + h)
        pen.text(x + 14, y + (h - _FONT["title"]) / 2, b.text, _FONT["title"])
    elif b.kind == "nav":
        cx = x + 10
        for link in b.items:
            width = pen.text(cx, y + 6, link, _FONT["label"])
            pen.line(cx, y + 27, cx + width, y + 27, 1)
            cx += width + 26
        pen.line(x, y + h - 2, x + w, y + h - 2, 1)
    elif b.kind == "footer":
        pen.line(x, y + 2, x + w, y + 2)
        width = _font(_FONT["small"]).getlength(b.text)
        pen.text(x + (w - width) / 2, y + 12, b.text, _FONT["small"])
    elif b.kind == "heading":
        pen.text(x + 2, y + 2, b.text, _FONT[f"h{b.level}"])
    elif b.kind == "paragraph":
        lines = _text_lines(b.length, w)
        rest = b.length / _line_chars(w) - (lines - 1)  # the last line is only partly full
        for i in range(lines):
            end = x + w - 4 if i < lines - 1 else x + max(24, (w - 4) * rest)
            pen.squiggle(x + 2, y + 8 + i * _LINE, end)
    elif b.kind == "image":
        iw = int(w * pen.rng.uniform(0.45, 0.75)) if _wide(w) else w
        pen.box(x, y, x + iw, y + h)
        pen.line(x, y, x + iw, y + h, 1)
        pen.line(x + iw, y, x, y + h, 1)
        tw = _font(_FONT["small"]).getlength(b.text)
        pen.draw.rectangle((x + 4, y + h - 21, x + 10 + tw, y + h - 4), fill=(255, 255, 255))
        pen.text(x + 7, y + h - 21, b.text, _FONT["small"])
    elif b.kind == "button":
        size = _FONT["label"] if _wide(w) else _FONT["small"]
        tw = _font(size).getlength(b.text)
        pen.rounded(x + 2, y + 2, x + tw + 28, y + h - 4)
        pen.text(x + 15, y + (h - 2 - size) / 2 - 1, b.text, size)
    elif b.kind == "form":
        fw = int(w * 0.75)
        pen.box(x, y, x + fw, y + h)
        for i, label in enumerate(b.items):
            ry = y + 12 + i * _INPUT_ROW
            pen.text(x + 12, ry + 5, label, _FONT["label"])
            pen.box(x + 120, ry, x + fw - 14, ry + 28)
        _draw(pen, Block("button", b.text), x + 12, y + 12 + len(b.items) * _INPUT_ROW, INNER)
    elif b.kind == "list":
        for i, item in enumerate(b.items):
            cy = y + i * _ITEM_H + 12
            pen.draw.ellipse((x + 4, cy - 3, x + 10, cy + 3), fill=pen.ink)
            pen.text(x + 18, cy - 10, item, _FONT["label"] if _wide(w) else _FONT["small"])
    elif b.kind in ("row", "columns"):
        cw = _child_width(b, w)
        gap = (w - cw * len(b.children)) // max(1, len(b.children) - 1)
        for i, child in enumerate(b.children):
            cx = x + i * (cw + gap)
            if b.kind == "columns" and i:
                pen.line(cx - gap / 2, y, cx - gap / 2, y + h, 1)  # columns are unboxed, so divide them
            _draw(pen, child, cx, y, cw, h if b.kind == "row" else None)  # cards stretch, as in a flex row
    elif b.kind in ("card", "column"):
        if b.kind == "card":
            pen.box(x, y, x + w, y + h)
            x, y, w = x + 8, y + 10, w - 16
        for child in b.children:
            _draw(pen, child, x, y, w)
            y += _height(child, w) + 6
    else:
        raise ValueError(f"unknown block kind {b.kind!r}")
