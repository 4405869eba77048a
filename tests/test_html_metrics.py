import pytest
from PIL import Image

from vlm_train.data.sketch2html import generate_pages
from vlm_train.eval.html_metrics import (
    Node,
    Rendered,
    Renderer,
    aggregate,
    html_scores,
    is_valid,
    layout_iou,
    parse_tree,
    screenshot_similarity,
    structure_exact,
    tag_f1,
    text_similarity,
    tree_similarity,
)

BLANK = Image.new("L", (64, 48), 255)


@pytest.fixture(scope="module")
def pages():
    return [page.html for page in generate_pages("test", 5)]


@pytest.fixture(scope="module")
def renderer():
    try:
        with Renderer() as r:
            yield r
    except RuntimeError as error:  # no Chromium: the visual scores are part of the contract, so fail, never skip
        pytest.fail(f"cannot render pages: {error}")


# ---------------------------------------------------------------- rendered end to end


def test_ground_truth_scores_one_against_itself(pages, renderer):
    for ref in pages:
        scores = html_scores(ref, ref, renderer)
        assert set(scores) == {"valid", "structure_exact", "tree_similarity", "tag_f1", "text_similarity",
                               "layout_iou", "screenshot_similarity"}  # fmt: skip
        assert scores == {key: 1.0 for key in scores}, ref
        assert all(type(value) is float for value in scores.values())  # plain floats, not numpy scalars
        assert structure_exact(ref, ref)
        assert renderer.render(ref).boxes, "a real page has visible semantic elements"
    summary = aggregate([html_scores(ref, ref) for ref in pages])
    assert summary["count"] == 5 and summary["valid"] == 1.0 and summary["tree_similarity"] == 1.0


def test_empty_prediction_scores_low(pages, renderer):
    shots = []
    for ref in pages:
        scores = html_scores("", ref, renderer)
        assert scores["valid"] == 1.0 and scores["structure_exact"] == 0.0
        assert scores["tree_similarity"] <= 0.2
        assert scores["tag_f1"] == 0.0
        assert scores["text_similarity"] < 0.2
        assert scores["layout_iou"] < 0.2
        shots.append(scores["screenshot_similarity"])
    # Pages are mostly white, so a blank page is close in pixels to one without a dark header (about 0.99 for two of
    # these five, 0.92-0.94 for the rest); it is still below the self-score of exactly 1.0 on every page.
    assert max(shots) < 0.996 and sum(shots) / len(shots) < 0.97, shots


def test_invalid_prediction_is_repaired_before_rendering(pages, renderer):
    ref = pages[0]
    last_end = ref.rindex("</")
    truncated = ref[:last_end]  # the model ran out of tokens before the final end tag
    scores = html_scores(truncated, ref, renderer)
    assert scores["valid"] == 0.0 and scores["tree_similarity"] == 0.0 and scores["structure_exact"] == 0.0
    assert scores["layout_iou"] > 0.99 and scores["screenshot_similarity"] > 0.99
    assert scores["tag_f1"] == 1.0  # the tags are all there, only one is left open


def test_a_page_cannot_navigate_away(renderer):
    # A meta refresh is well-formed HTML and the CSP does not stop it; unrepaired, it would destroy the page.
    shown = renderer.render('<p>a</p><meta http-equiv="refresh" content="0;url=http://example.com/">')
    assert [box[0] for box in shown.boxes] == ["p"]
    assert [box[0] for box in renderer.render("<h1>after</h1>").boxes] == ["h1"]  # not cached: a real render


def test_renderer_fails_clearly_without_chromium(monkeypatch):
    monkeypatch.setenv("VLM_CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(RuntimeError, match="apt-get install chromium"):
        with Renderer():
            pass


def test_render_before_opening_is_an_error():
    with pytest.raises(RuntimeError, match="with Renderer"):
        Renderer().render("<p>x</p>")


# ---------------------------------------------------------------- tree, tags, text


def test_parse_tree_keeps_tags_classes_and_order_but_not_text():
    tree = parse_tree('<nav><a>Home</a><a>Blog</a></nav><section class="row"><img alt="x"></section>')
    assert tree == Node("body", "", (Node("nav", "", (Node("a"), Node("a"))), Node("section", "row", (Node("img"),))))
    assert tree.children[1].label == "section.row"
    assert parse_tree("") == Node("body")


def test_validity():
    assert is_valid('<main><form><label>Email<input></label><button>Send</button></form><img alt="a"></main>')
    assert is_valid("<p>Q&amp;A &lt;3</p>")  # escaped text is fine
    assert not is_valid("<main><p>x</main>")  # p never closed
    assert not is_valid("</div>")  # stray end tag
    assert not is_valid("<main><p>x</p>")  # main left open
    assert not is_valid("<p>x</p></p>")
    assert not is_valid("<main></main><foot")  # cut off inside a tag
    assert not is_valid("<div/>")  # browsers ignore the slash and leave the div open
    assert not is_valid("<p>x</p></input>")


def test_tag_f1_hand_case():
    # pred tags {p, p}, ref tags {p, h1}: one p in common, so precision 1/2, recall 1/2, F1 1/2.
    assert tag_f1("<p>a</p><p>b</p>", "<p>a</p><h1>b</h1>") == pytest.approx(0.5)
    assert tag_f1("", "") == 1.0
    assert tag_f1("<p>a", "<p>a</p>") == 1.0  # counted even where the markup is broken


def test_tree_similarity_one_relabelled_node():
    ref = "<header><h1>A</h1></header><main><p>x</p><p>y</p></main>"
    pred = "<header><h1>A</h1></header><main><p>x</p><h2>y</h2></main>"
    # N = 5 elements (header, h1, main, p, p); one relabel p -> h2 costs 1, so 1 - 1/5.
    assert tree_similarity(pred, ref) == pytest.approx(1 - 1 / 5)
    cards = '<section class="{}"><div class="card"><h3>A</h3></div><div class="card"><h3>B</h3></div></section><footer>f</footer>'
    # N = 6 (section, div, h3, div, h3, footer); the class is part of the label, so row -> cols is one relabel.
    assert tree_similarity(cards.format("cols"), cards.format("row")) == pytest.approx(1 - 1 / 6)
    assert tree_similarity(ref, ref) == 1.0
    assert tree_similarity("", ref) == 0.0
    assert tree_similarity("<main><p>x</main>", ref) == 0.0  # invalid prediction
    with pytest.raises(ValueError, match="reference"):
        tree_similarity(ref, "<main>")


def test_structure_exact_ignores_text_but_not_order():
    ref = "<h1>Welcome</h1><p>We make tools.</p>"
    assert structure_exact("<h1>Hello</h1><p>Other words entirely.</p>", ref)
    assert not structure_exact("<p>We make tools.</p><h1>Welcome</h1>", ref)
    assert not structure_exact('<h1 class="x">Welcome</h1><p>We make tools.</p>', ref)
    assert not structure_exact("<h1>Welcome</h1><p>We make tools.", ref)


def test_text_similarity():
    assert text_similarity("", "") == 1.0
    # Whitespace is normalised, tags separate words, entities are decoded.
    assert text_similarity("<p>Q&amp;A\n  hub</p><a>Home</a>", "<p>Q&A hub</p> <a> Home</a>") == 1.0
    assert text_similarity("<p>abcd</p>", "<p>abxy</p>") == pytest.approx(0.5)  # 2 matching of 4 + 4 characters
    assert text_similarity("", "<p>Hello</p>") == 0.0
    assert text_similarity("<p>Q&A &copy &#65;</p>", "<p>Q&amp;A \u00a9 A</p>") == 1.0  # bare "&A" shows as written
    assert text_similarity("<style>p{}</style><p>x</p>", "<p>x</p>") == 1.0  # stylesheet text is not visible


# ---------------------------------------------------------------- layout and pixels, without a browser


def test_layout_iou_hand_built():
    # Two 10x10 boxes offset by 5 px: intersection 5*10 = 50, union 100 + 100 - 50 = 150, IoU = 1/3.
    pred = Rendered(BLANK, [("div.card", 0.0, 0.0, 10.0, 10.0)])
    ref = Rendered(BLANK, [("div.card", 5.0, 0.0, 10.0, 10.0)])
    assert layout_iou(pred, ref) == pytest.approx(1 / 3)
    # A second card only in the reference pairs with nothing: (1/3 + 0) / 2.
    ref_extra = Rendered(BLANK, [*ref.boxes, ("div.card", 0.0, 20.0, 10.0, 10.0)])
    assert layout_iou(pred, ref_extra) == pytest.approx(1 / 6)
    # A different kind never pairs, even in the same place.
    assert layout_iou(Rendered(BLANK, [("p", 5.0, 0.0, 10.0, 10.0)]), ref) == 0.0
    assert layout_iou(Rendered(BLANK), Rendered(BLANK)) == 1.0


def test_screenshot_similarity():
    black = Rendered(Image.new("L", (64, 48), 0))
    white = Rendered(BLANK)
    assert screenshot_similarity(white, white) == 1.0
    assert screenshot_similarity(black, white) == 0.0
    half = Image.new("L", (64, 48), 255)
    half.paste(0, (0, 0, 32, 48))
    assert screenshot_similarity(Rendered(half), white) == pytest.approx(0.5)


def test_aggregate_means_and_count():
    summary = aggregate([{"valid": 1.0, "tag_f1": 0.5}, {"valid": 0.0, "tag_f1": 1.0}])
    assert summary == {"valid": 0.5, "tag_f1": 0.75, "count": 2}
    assert aggregate([]) == {"count": 0}


def test_renderer_without_playwright_names_the_extra(monkeypatch):
    import sys

    from vlm import render

    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # as if it were not installed
    with pytest.raises(render.RendererUnavailable, match=r"pip install 'vlm\[render\]'"):
        with Renderer():
            pass
