"""Scores for generated sketch-to-HTML pages against the reference body HTML.

Structural scores work on the tag tree (``html.parser``, text nodes left out); visual scores
render both pages in one headless Chromium (:mod:`vlm.render`, the renderer of
``vlm sketch2html --render`` too) and compare element boxes and screenshots. Pages are
always rendered through ``vlm.html.document``, whose CSP forbids scripts and network, and
the browser additionally refuses every request it is asked to make.
"""

from __future__ import annotations

import html
import io
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from html.parser import HTMLParser

import numpy as np
import zss
from PIL import Image

from vlm import render
from vlm.html import VOID, document, repair_html

# The elements whose boxes the layout score compares; ``div`` only as a card, because the
# other divs (columns) are invisible wrappers whose boxes repeat their contents'.
LAYOUT_SELECTOR = "header, nav, a, h1, h2, h3, p, img, button, form, input, label, ul, li, div.card, section, footer"
SCREENSHOT_COMPARE_SIZE = (256, 192)  # small enough to forgive sub-pixel text differences, large enough to see blocks
_INVISIBLE = {"script", "style", "template", "title"}  # their text never shows on the page
_CACHED_RENDERS = 32  # a reference is often scored against several predictions in a row


@dataclass(frozen=True)
class Node:
    """An element of the tag tree: tag name, its class (sorted names joined by spaces, or ""), children."""

    tag: str
    css_class: str = ""
    children: tuple[Node, ...] = ()

    @property
    def label(self) -> str:
        return _kind(self.tag, self.css_class)

    def size(self) -> int:
        """Elements in this subtree, this one included."""
        return 1 + sum(child.size() for child in self.children)


def _kind(tag: str, css_class: str | None) -> str:
    # Class order does not change what an element is, so "a b" and "b a" get one label.
    return tag + "".join(f".{name}" for name in sorted((css_class or "").split()))


class _TreeParser(HTMLParser):
    """Builds the tag tree, collects visible text and tags, and notes whether the markup was well-formed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)  # so an escaped "&lt;" stays apart from a raw, broken "<"
        self.stack: list[tuple[str, str, list[Node]]] = [("body", "", [])]
        self.tags: list[str] = []
        self.text: list[str] = []
        self.invisible = 0
        self.well_formed = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.text.append(" ")  # tags separate words even without whitespace around them
        css_class = " ".join(sorted(next((v or "" for k, v in attrs if k == "class"), "").split()))  # as in _kind
        if tag in VOID:
            self.stack[-1][2].append(Node(tag, css_class))
            return
        self.stack.append((tag, css_class, []))
        if tag in _INVISIBLE:
            self.invisible += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            # Browsers ignore the slash in "<div/>", so the element stays open and swallows what follows: the tree the
            # author meant is not the one rendered.
            self.well_formed = False
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        self.text.append(" ")
        if len(self.stack) == 1 or self.stack[-1][0] != tag:
            self.well_formed = False  # stray or mismatched end tag (a void element's "</input>" included)
            return
        open_tag, css_class, children = self.stack.pop()
        self.stack[-1][2].append(Node(open_tag, css_class, tuple(children)))
        if open_tag in _INVISIBLE:
            self.invisible -= 1

    def handle_data(self, data: str) -> None:
        if "<" in data:
            self.well_formed = False  # a tag cut off mid-way, or unescaped text the canonical writer never produces
        if not self.invisible:
            self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        # The parser also reports a bare "&A" (no semicolon) here; like a browser, show an unknown name as written.
        # Decoded text skips the raw "<" check: an escaped "&lt;" is legitimate.
        decoded = html.unescape(f"&{name};")
        self.text.append("" if self.invisible else f"&{name}" if decoded == f"&{name};" else decoded)

    def handle_charref(self, name: str) -> None:
        self.text.append("" if self.invisible else html.unescape(f"&#{name};"))

    def root(self) -> Node | None:
        if not self.well_formed or len(self.stack) != 1:
            return None
        return Node("body", "", tuple(self.stack[0][2]))

    def visible_text(self) -> str:
        return " ".join("".join(self.text).split())


def _parse(body_html: str) -> _TreeParser:
    parser = _TreeParser()
    parser.feed(body_html)
    parser.close()
    return parser


def parse_tree(body_html: str) -> Node | None:
    """The tag tree under a synthetic ``body`` root, or None when the markup is not well-formed."""
    return _parse(body_html).root()


def is_valid(body_html: str) -> bool:
    """Whether every element is closed in order (void elements excepted) and no end tag is stray."""
    return parse_tree(body_html) is not None


def _reference_tree(ref: str) -> Node:
    tree = parse_tree(ref)
    if tree is None:
        raise ValueError(f"the reference HTML is not well-formed: {ref[:80]!r}")
    return tree


def tree_similarity(pred: str, ref: str) -> float:
    """``1 - TED / max(size)`` over the tag trees (labels tag plus class), in [0, 1]; 0.0 for invalid ``pred``.

    Sizes count the page's elements, not the synthetic root (which both trees share, so it never adds to the
    distance): an empty prediction scores 0 against any non-empty page.
    """
    ref_tree = _reference_tree(ref)
    pred_tree = parse_tree(pred)
    if pred_tree is None:
        return 0.0
    largest = max(pred_tree.size(), ref_tree.size()) - 1
    if largest == 0:
        return 1.0
    distance = zss.simple_distance(pred_tree, ref_tree, lambda n: list(n.children), lambda n: n.label)
    # The distance can exceed the larger size (deleting all of one tree and inserting all of the other), so clamp.
    return max(0.0, 1.0 - float(distance) / largest)  # zss returns a numpy float


def structure_exact(pred: str, ref: str) -> bool:
    """Whether the tag trees (tags, classes, nesting, order) are identical; text is ignored."""
    pred_tree = parse_tree(pred)
    return pred_tree is not None and pred_tree == _reference_tree(ref)


def tag_f1(pred: str, ref: str) -> float:
    """F1 of the multisets of tag names; the prediction need not be well-formed. 1.0 when both have no tags."""
    pred_tags, ref_tags = Counter(_parse(pred).tags), Counter(_parse(ref).tags)
    if not pred_tags and not ref_tags:
        return 1.0
    common = sum((pred_tags & ref_tags).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred_tags.values()), common / sum(ref_tags.values())
    return 2 * precision * recall / (precision + recall)


def text_similarity(pred: str, ref: str) -> float:
    """``difflib`` ratio of the visible texts, whitespace-normalised; 1.0 when both are empty."""
    a, b = _parse(pred).visible_text(), _parse(ref).visible_text()
    if not a and not b:
        return 1.0
    # autojunk would treat frequent characters (spaces, "e") of texts over 200 characters as junk and skew the ratio.
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


# ---------------------------------------------------------------- rendering


Box = tuple[str, float, float, float, float]  # kind (tag plus classes), x, y, width, height in CSS pixels


@dataclass
class Rendered:
    """A rendered page: its grayscale screenshot and the boxes of its semantic elements in document order."""

    screenshot: Image.Image
    boxes: list[Box] = field(default_factory=list)


class Renderer:
    """One headless Chromium (:class:`vlm.render.Renderer`) that renders many pages for
    scoring, with the page shell, the repair pass and a small cache; use as a context manager."""

    def __init__(self, width: int = 1024, height: int = 768) -> None:
        self._browser = render.Renderer(width, height)
        self._open = False
        self._cache: OrderedDict[str, Rendered] = OrderedDict()

    def __enter__(self) -> Renderer:
        self._browser.__enter__()
        self._open = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._browser.close()
        self._open = False

    def render(self, body_html: str) -> Rendered:
        """Screenshot (viewport, grayscale) and element boxes of ``vlm.html.document`` around the repaired body.

        Repaired as the app shows pages; that also drops what could leave the page (a meta refresh, which the CSP
        does not stop), so the next render still finds it in place. Well-formed canonical HTML comes out unchanged.
        """
        if not self._open:
            raise RuntimeError("Renderer is not open: use it as `with Renderer() as renderer:`")
        if body_html in self._cache:
            self._cache.move_to_end(body_html)
            return self._cache[body_html]
        snapshot = self._browser.render(document(repair_html(body_html)[0]), LAYOUT_SELECTOR)
        boxes = [(_kind(tag, cls), x, y, w, h) for tag, cls, x, y, w, h in snapshot.boxes if w > 0 and h > 0]
        rendered = Rendered(Image.open(io.BytesIO(snapshot.png)).convert("L"), boxes)
        self._cache[body_html] = rendered
        if len(self._cache) > _CACHED_RENDERS:
            self._cache.popitem(last=False)
        return rendered


def _iou(a: Box, b: Box) -> float:
    _, ax, ay, aw, ah = a
    _, bx, by, bw, bh = b
    overlap_w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    overlap_h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = overlap_w * overlap_h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def layout_iou(pred: Rendered, ref: Rendered) -> float:
    """Mean box IoU, pairing the i-th element of a kind in ``pred`` with the i-th of that kind in ``ref``.

    Unpaired elements count as IoU 0. Each kind is averaged over the larger of its two counts, then the kinds are
    averaged, so twenty list items do not outweigh the one header. 1.0 when neither page has any element.
    """
    by_kind: dict[str, tuple[list[Box], list[Box]]] = defaultdict(lambda: ([], []))
    for box in pred.boxes:
        by_kind[box[0]][0].append(box)
    for box in ref.boxes:
        by_kind[box[0]][1].append(box)
    if not by_kind:
        return 1.0
    means = [sum(map(_iou, p, r)) / max(len(p), len(r)) for p, r in by_kind.values()]
    return sum(means) / len(means)


def screenshot_similarity(pred: Rendered, ref: Rendered) -> float:
    """``1 -`` the mean absolute difference of the grayscale screenshots, both shrunk to 256x192, in [0, 1]."""
    a, b = (
        np.asarray(r.screenshot.convert("L").resize(SCREENSHOT_COMPARE_SIZE, Image.Resampling.BOX), dtype=np.float32)
        for r in (pred, ref)
    )
    return float(1.0 - np.abs(a - b).mean() / 255.0)


# ---------------------------------------------------------------- per page and per set


def html_scores(pred: str, ref: str, renderer: Renderer | None = None) -> dict[str, float]:
    """Every score of one prediction; ``layout_iou`` and ``screenshot_similarity`` only with a renderer.

    An invalid prediction scores 0 on the tree scores, but the renderer repairs it first, as the app would show it,
    so its layout is still measured.
    """
    scores = {
        "valid": float(is_valid(pred)),
        "structure_exact": float(structure_exact(pred, ref)),
        "tree_similarity": tree_similarity(pred, ref),
        "tag_f1": tag_f1(pred, ref),
        "text_similarity": text_similarity(pred, ref),
    }
    if renderer is not None:
        pred_render, ref_render = renderer.render(pred), renderer.render(ref)
        scores["layout_iou"] = layout_iou(pred_render, ref_render)
        scores["screenshot_similarity"] = screenshot_similarity(pred_render, ref_render)
    return scores


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over the pages that have it (``valid`` becomes the validity rate), plus ``count``."""
    totals: dict[str, list[float]] = defaultdict(list)
    for page in scores:
        for key, value in page.items():
            totals[key].append(value)
    result = {key: sum(values) / len(values) for key, values in totals.items()}
    result["count"] = len(scores)
    return result
