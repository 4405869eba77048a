"""Synthetic generators: determinism, held-out combinations, QA consistency, compact valid HTML, sketches."""

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from vlm_train.data.shapes import COLORS, HELD_OUT, PALETTE, SHAPES, generate_scenes
from vlm_train.data.sketch2html import MAX_HTML_CHARS, SKETCH_SIZE, STYLESHEET, document, generate_pages

CSP = "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
VOID = {"img", "input", "meta", "br", "hr", "link"}


@pytest.fixture(scope="module")
def scenes():
    return {"train": list(generate_scenes("train", 200)), "val": list(generate_scenes("val", 50)),
            "test": list(generate_scenes("test", 50))}  # fmt: skip


@pytest.fixture(scope="module")
def pages():
    return list(generate_pages("train", 50)) + list(generate_pages("test", 10))


def scene_signature(scene):
    return scene.key, scene.image.tobytes(), scene.objects, scene.caption, scene.qa


def page_signature(page):
    return page.key, page.sketch.tobytes(), page.layout, page.html


# ---------------------------------------------------------------- shapes


def test_scenes_are_deterministic_and_independent_of_count():
    five = [scene_signature(s) for s in generate_scenes("val", 5, seed=3)]
    assert five == [scene_signature(s) for s in generate_scenes("val", 5, seed=3)]
    assert [scene_signature(s) for s in generate_scenes("val", 3, seed=3)] == five[:3]
    assert len({sig[1] for sig in five}) == 5  # samples differ from one another
    others = [next(generate_scenes(split, 1, seed=seed)).image.tobytes() for split, seed in
              (("train", 3), ("test", 3), ("val", 4))]  # fmt: skip
    assert all(image != five[0][1] for image in others)
    assert [s.key for s in generate_scenes("test", 2)] == ["shapes-test-000000", "shapes-test-000001"]


def test_unknown_split_raises_at_the_call():
    with pytest.raises(ValueError, match="'training'"):
        generate_scenes("training", 1)
    with pytest.raises(ValueError, match="'dev'"):
        generate_pages("dev", 1)


def test_held_out_combinations_only_in_test(scenes):
    assert 0.15 <= len(HELD_OUT) / (len(COLORS) * len(SHAPES)) <= 0.2
    for split in ("train", "val"):
        for scene in scenes[split]:
            assert not {(o.color, o.shape) for o in scene.objects} & HELD_OUT, scene.key
            # Not even named in the text, e.g. as the subject of a "no" question.
            text = " ".join([scene.caption, *(q for q, _ in scene.qa)])
            assert not any(f"{c} {s}" in text for c, s in HELD_OUT), scene.key
    for scene in scenes["test"]:
        assert {(o.color, o.shape) for o in scene.objects} & HELD_OUT, scene.key
    train_objects = [o for s in scenes["train"] for o in s.objects]
    assert {o.color for o in train_objects} == set(COLORS)
    assert {o.shape for o in train_objects} == set(SHAPES)
    assert {o.size for o in train_objects} == {"small", "large"}
    assert {len(s.objects) for s in scenes["train"]} == {1, 2, 3, 4}


def test_objects_are_drawn_inside_the_image_and_apart(scenes):
    small = list(generate_scenes("train", 20, image_size=64))
    assert all(s.image.size == (64, 64) and s.image.mode == "RGB" for s in small)
    for scene in [*scenes["train"], *scenes["test"], *small]:
        size = scene.image.size[0]
        assert scene.image.mode == "RGB"
        for i, o in enumerate(scene.objects):
            assert 0 <= o.x - o.radius and o.x + o.radius < size and 0 <= o.y - o.radius and o.y + o.radius < size
            assert scene.image.getpixel((o.x, o.y)) == PALETTE[o.color], (scene.key, o)  # the object is there
            for other in scene.objects[i + 1 :]:
                assert math.hypot(o.x - other.x, o.y - other.y) >= o.radius + other.radius, scene.key
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)


def check_answer(objects, question, answer):
    """Recompute an answer from the objects; returns the question type."""
    by_name = {f"{o.color} {o.shape}": o for o in objects}
    if question == "How many objects are there?":
        assert answer == str(len(objects))
        return "count"
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        [obj] = [o for o in objects if o.shape == m[1]]  # exactly one such shape, or the question is ambiguous
        assert answer == obj.color
        return "colour"
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        [obj] = [o for o in objects if o.color == m[1]]
        assert answer == obj.shape
        return "shape"
    if m := re.fullmatch(r"What size is the (\w+ \w+)\?", question):
        assert answer == by_name[m[1]].size
        return "size"
    if m := re.fullmatch(r"Is there (a|an) (\w+) (\w+)\?", question):
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a")
        assert answer == ("yes" if f"{m[2]} {m[3]}" in by_name else "no")
        return "exist"
    if m := re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        a, b = by_name[m[1]], by_name[m[3]]
        offset = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[m[2]]
        # Only clear-cut relations are asked: true by many pixels, or clearly false.
        assert abs(offset) >= 8 and answer == ("yes" if offset > 0 else "no")
        return "relation"
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_follow_from_the_objects(scenes):
    kinds, answers = set(), set()
    for scene in scenes["train"] + scenes["test"]:
        for question, answer in scene.qa:
            assert re.fullmatch(r"[a-z0-9]+", answer), (question, answer)
            kinds.add(check_answer(scene.objects, question, answer))
            answers.add(answer)
        assert len({q for q, _ in scene.qa}) == len(scene.qa)
    assert kinds == {"count", "colour", "shape", "size", "exist", "relation"}
    assert {"yes", "no"} <= answers


def test_captions_mention_every_object(scenes):
    for scene in scenes["train"] + scenes["test"]:
        for o in scene.objects:
            assert f"a {o.size} {o.color} {o.shape}" in scene.caption, scene.key
        if len(scene.objects) == 1:
            assert scene.caption == f"a {o.size} {o.color} {o.shape}"
        else:
            assert re.search(r"\b(left of|right of|above|below)\b", scene.caption), scene.caption


# ---------------------------------------------------------------- sketch2html


class TagTree(HTMLParser):
    """Checks tags balance; keeps the text, the alt texts and each element's (tag, class, children)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = ("#root", None, [])
        self.stack = [self.root]
        self.texts, self.alts = [], []

    def handle_starttag(self, tag, attrs):
        node = (tag, dict(attrs).get("class"), [])
        self.stack[-1][2].append(node)
        if tag == "img":
            self.alts.append(dict(attrs)["alt"])
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        raise AssertionError(f"self-closing <{tag}/> is not canonical")

    def handle_endtag(self, tag):
        assert tag not in VOID and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1][0]}"
        self.stack.pop()

    def handle_data(self, data):
        self.texts.append(data)


def parse(text):
    tree = TagTree()
    tree.feed(text)
    tree.close()
    assert len(tree.stack) == 1, f"unclosed {[n[0] for n in tree.stack[1:]]}"
    return tree


def expected_node(block):
    children = [expected_node(c) for c in block.children]
    if block.kind == "header":
        children = [("h1", None, [])]
    elif block.kind in ("nav", "list"):
        children = [("a" if block.kind == "nav" else "li", None, [])] * len(block.items)
    elif block.kind == "form":
        children = [("label", None, [("input", None, [])])] * len(block.items) + [("button", None, [])]
    return (block.tag, block.css_class, children)


def visible_text(block):
    # Document order: items (links, list items, field labels) come before a form's button label.
    if block.kind == "image":
        return []
    return [*block.items, *([block.text] if block.text else []), *(t for c in block.children for t in visible_text(c))]


def test_pages_are_deterministic_and_independent_of_count():
    five = [page_signature(p) for p in generate_pages("val", 5, seed=1)]
    assert five == [page_signature(p) for p in generate_pages("val", 5, seed=1)]
    assert [page_signature(p) for p in generate_pages("val", 3, seed=1)] == five[:3]
    assert len({sig[3] for sig in five}) == 5
    for split, seed in (("train", 1), ("test", 1), ("val", 2)):
        assert page_signature(next(generate_pages(split, 1, seed=seed)))[1:] != five[0][1:]
    assert next(generate_pages("test", 1)).key == "sketch-test-000000"


def test_html_is_canonical_balanced_and_matches_the_layout(pages):
    for page in pages:
        tree = parse(page.html)
        assert "<script" not in page.html and "style=" not in page.html and not re.search(r">\s|\s<", page.html)
        # Header, then nav, then the content blocks (inside <main>), then footer.
        rank = [{"header": 0, "nav": 1, "footer": 3}.get(b.kind, 2) for b in page.layout]
        assert rank == sorted(rank) and rank.count(0) <= 1 and rank.count(1) <= 1 and rank.count(3) <= 1
        assert 3 <= len(page.layout) <= 8 and 2 in rank
        top = tree.root[2]
        main = [node for node in top if node[0] == "main"]
        assert len(main) == 1
        flattened = [n for node in top for n in (node[2] if node[0] == "main" else [node])]
        assert [(n[0], n[1]) for n in flattened] == [(b.tag, b.css_class) for b in page.layout]
        assert flattened == [expected_node(b) for b in page.layout]  # the whole tree, not just the top
        assert [t for b in page.layout for t in visible_text(b)] == tree.texts  # escaped text reads back exactly
        assert tree.alts == [b.text for b in iter_blocks(page.layout) if b.kind == "image"]


def iter_blocks(blocks):
    for b in blocks:
        yield b
        yield from iter_blocks(b.children)


def test_grammar_covers_every_element(pages):
    blocks = list(iter_blocks(b for p in pages for b in p.layout))
    kinds = {b.kind for b in blocks}
    assert kinds == {"header", "nav", "heading", "paragraph", "image", "button", "form", "list", "row", "card",
                     "columns", "column", "footer"}  # fmt: skip
    assert {b.level for b in blocks if b.kind == "heading"} == {1, 2, 3}
    assert all(2 <= len(b.items) <= 5 for b in blocks if b.kind in ("nav", "list"))
    assert all(2 <= len(b.children) <= 4 for b in blocks if b.kind == "row")
    # Escaping is exercised: some vocabulary has "&", which must reach the html as &amp;.
    amp = [p for p in pages if any("&" in t for b in p.layout for t in visible_text(b))]
    assert amp and all("&amp;" in p.html and "& " not in p.html for p in amp)


def drawn_paragraphs(layout, width):
    """(lines drawn, width, target text) of every paragraph, as the sketch draws it."""
    from vlm_train.data.sketch2html import _child_width, _text_lines

    for b in layout:
        if b.kind == "paragraph":
            yield _text_lines(b.length, width), width, b.text
        elif b.children:
            inner = (
                _child_width(b, width) if b.kind in ("row", "columns") else width - 16 if b.kind == "card" else width
            )
            yield from drawn_paragraphs(b.children, inner)


def test_paragraph_text_is_a_placeholder_fixed_by_the_drawing(pages):
    from vlm_train.data.sketch2html import INNER, LOREM, placeholder

    seen: dict[tuple[int, int], str] = {}
    for page in pages:
        for lines, width, text in drawn_paragraphs(page.layout, INNER):
            # Same drawn size, same text, whichever page it is on.
            assert seen.setdefault((lines, width), text) == text, page.key
            assert text == placeholder(lines, width) and text.startswith("Lorem")
    assert len({lines for lines, _ in seen}) >= 3  # paragraphs of several line counts occur
    for width in (80, 230, 480):  # more lines, more text; wider lines, more text
        texts = [placeholder(n, width) for n in range(1, 6)]
        assert all(a.rstrip(".") in b for a, b in zip(texts, texts[1:])) and len(set(texts)) == 5
        assert len(placeholder(2, width)) <= len(placeholder(2, width + 150))
    words = placeholder(40, 480).rstrip(".").lower().split()
    assert words[: len(LOREM)] == LOREM and words[len(LOREM)] == LOREM[0]  # past the end it starts again


def test_html_is_compact(pages):
    lengths = sorted(len(p.html) for p in pages)
    assert lengths[-1] <= MAX_HTML_CHARS < 1500
    assert lengths[0] >= 40 and lengths[len(lengths) // 2] <= 700


def test_document_wraps_body_in_a_safe_html5_page():
    html_doc = document("<main><p>Tips &amp; tricks</p></main>", title='<Shop> & "more"')
    assert html_doc.startswith("<!DOCTYPE html>\n") and '<html lang="en">' in html_doc
    assert CSP in html_doc and '<meta charset="utf-8">' in html_doc
    assert f"<style>{STYLESHEET}</style>" in html_doc and "<script" not in html_doc
    assert "<title>&lt;Shop&gt; &amp; &quot;more&quot;</title>" in html_doc
    assert "<body><main><p>Tips &amp; tricks</p></main></body>" in html_doc
    tree = parse(html_doc)
    [html_node] = tree.root[2]
    assert [n[0] for n in html_node[2]] == ["head", "body"]
    assert "Tips & tricks" in tree.texts and '<Shop> & "more"' in tree.texts


def test_sketches_are_drawn(pages):
    for page in pages[:20]:
        image = page.sketch
        assert image.mode == "RGB" and image.size == SKETCH_SIZE
        gray = image.convert("L")
        histogram = gray.histogram()
        dark, white = sum(histogram[:100]), histogram[255]
        assert dark > 300, page.key  # boxes, labels and squiggles
        assert white > 0.5 * SKETCH_SIZE[0] * SKETCH_SIZE[1], page.key  # on white paper
        # The first block starts at the top margin and the generator keeps the last one on the canvas.
        left, top, right, bottom = gray.point(lambda v: 255 if v < 100 else 0).getbbox()
        assert top < 40 and bottom <= SKETCH_SIZE[1] - 8 and right <= SKETCH_SIZE[0] - 8, page.key


def test_rendering_in_worker_processes_gives_the_same_samples_in_order():
    from vlm_train.data import builders

    for build in (
        lambda **kw: builders.sketches("test", 6, **kw),
        lambda **kw: builders.shapes("val", 5, kind="qa", **kw),
        lambda **kw: builders.shapes("val", 5, seed=2, kind="caption", **kw),
    ):
        alone = list(build())
        assert alone and alone == list(build(workers=2))
    with pytest.raises(ValueError, match="split"):
        next(builders.sketches("tset", 2, workers=2))


def test_sketch_styles_change_the_drawing_not_the_page():
    from vlm_train.data.sketch2html import STYLES, page_at

    plain = [page_at("test", i) for i in range(4)]
    for style in STYLES[1:]:
        styled = [page_at("test", i, style=style) for i in range(4)]
        assert [p.html for p in styled] == [p.html for p in plain] and [p.layout for p in styled] == [
            p.layout for p in plain
        ]
        assert all(s.sketch.size == SKETCH_SIZE for s in styled)
        assert sum(s.sketch.tobytes() != p.sketch.tobytes() for s, p in zip(styled, plain)) >= 3, style
        assert [s.sketch.tobytes() for s in styled] == [
            page_at("test", i, style=style).sketch.tobytes() for i in range(4)
        ]
    with pytest.raises(ValueError, match="unknown sketch style"):
        page_at("test", 0, style="crayon")


def test_photographed_sketches_look_like_photos_and_keep_the_ink():
    from vlm_train.data.sketch2html import page_at

    for i in range(3):
        plain, photo = page_at("test", i).sketch, page_at("test", i, style="photo").sketch
        arr = np.asarray(photo, dtype=np.float32)
        assert arr[..., 2].mean() < arr[..., 0].mean()  # warm paper, not white
        assert (arr > 250).all(-1).mean() < 0.05  # almost no pure white left
        # Ink still shows: dark strokes stand out from the paper around them.
        assert (np.asarray(photo.convert("L")) < 90).sum() > 0.2 * (np.asarray(plain.convert("L")) < 90).sum()


def test_held_out_styles_lie_at_or_past_the_edge_of_the_training_variety():
    import random

    from vlm_train.data.sketch_style import HELD_OUT, random_style

    drawn = [random_style(random.Random(i)) for i in range(2000)]
    assert HELD_OUT["marker"].pen > max(s.pen for s in drawn)
    assert HELD_OUT["handwriting"].slant > max(s.slant for s in drawn)
    assert HELD_OUT["handwriting"].jitter > max(s.jitter for s in drawn)
    assert HELD_OUT["loose"].spacing > max(s.spacing for s in drawn)
    assert HELD_OUT["loose"].zoom < min(s.zoom for s in drawn)
    assert HELD_OUT["photo"].photo > max(s.photo for s in drawn)
    assert 0.25 < sum(s == type(s)() for s in drawn) / len(drawn) < 0.42  # a third drawn as the original


def test_vlm_data_sketch_writes_a_style(tmp_path):
    from vlm_train.data import builders
    from vlm_train.data.cli import main as data_main
    from vlm_train.data.shards import iter_tar
    from vlm_train.data.sketch2html import page_at

    assert data_main(["sketch", "--split", "test", "--count", "2", "--style", "marker", "--out", str(tmp_path)]) == 0
    (shard,) = tmp_path.glob("sketch-test-marker-*.tar")
    samples = list(iter_tar(shard))
    assert [s["html"].decode() for s in samples] == [page_at("test", i).html for i in range(2)]
    with pytest.raises(SystemExit):
        data_main(["sketch", "--count", "1", "--style", "crayon", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown sketch style"):
        next(builders.sketches("test", 1, style="crayon"))
