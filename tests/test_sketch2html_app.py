import os
import shutil
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
from conftest import make_checkpoint
from PIL import Image

import vlm
import vlm.generate
from vlm import render
from vlm.apps import sketch2html
from vlm.html import document
from vlm.tasks import sketch_to_html
from vlm_train.data.sketch2html import generate_pages

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
CSP = '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'


class TagBalance(HTMLParser):
    """Records every way the tags of a page fail to nest."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.seen = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.seen.add(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.seen.add(tag)
        if tag not in VOID:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void <{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> while {self.stack[-1:] or 'nothing'} is open")
        else:
            self.stack.pop()


def assert_valid_page(text):
    assert text.startswith("<!DOCTYPE html>")
    assert CSP in text
    assert "<script" not in text.lower()
    parser = TagBalance()
    parser.feed(text)
    parser.close()
    assert parser.errors == []
    assert parser.stack == [], f"left open: {parser.stack}"
    assert {"html", "head", "body", "title"} <= parser.seen


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sketch2html_model"))


@pytest.fixture(scope="module")
def sketches():
    return [page.sketch for page in generate_pages("test", 2)]


def run(checkpoint, *args):
    return sketch2html.main([*map(str, args), "--model", str(checkpoint), "--max_new_tokens", "30"])


def test_checker_rejects_unbalanced_pages():
    # The checker is what the other tests rely on, so it must catch what repair_html exists to fix.
    for broken in ("<div><p>x</div>", "<div>", "</span>"):
        parser = TagBalance()
        parser.feed(broken)
        assert parser.errors or parser.stack, broken


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        sketch2html.main(["--help"])
    assert exc.value.code == 0
    assert "--render" in capsys.readouterr().out


def test_writes_a_complete_page_next_to_the_sketch(checkpoint, sketches, tmp_path, capsys):
    sketches[0].save(tmp_path / "x.png")
    assert run(checkpoint, tmp_path / "x.png") == 0
    assert_valid_page((tmp_path / "x.html").read_text(encoding="utf-8"))
    assert sorted(os.listdir(tmp_path)) == ["x.html", "x.png"]  # no temp file left, no screenshot unasked
    assert "wrote 1 pages (0 rendered), failed 0" in capsys.readouterr().out


def test_bad_inputs_are_reported_and_skipped(checkpoint, sketches, tmp_path, capsys):
    sketches[0].save(tmp_path / "good.png")
    sketches[1].save(tmp_path / "good2.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out"
    code = run(
        checkpoint,
        tmp_path / "good.png",
        tmp_path / "corrupt.png",
        tmp_path / "missing.png",
        tmp_path / "good2.png",
        "--out_dir",
        out,
        "--batch_size",
        "2",
    )
    captured = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'corrupt.png'}: error: not a readable image" in captured.err
    assert f"{tmp_path / 'missing.png'}: error: file not found" in captured.err
    assert "Traceback" not in captured.err
    assert sorted(os.listdir(out)) == ["good.html", "good2.html"]
    for name in ("good.html", "good2.html"):
        assert_valid_page((out / name).read_text(encoding="utf-8"))
    assert "wrote 2 pages (0 rendered), failed 2" in captured.out


def test_same_stem_in_one_out_dir_is_refused(checkpoint, sketches, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sketches[0].save(tmp_path / folder / "x.png")
    code = run(checkpoint, tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out_dir", tmp_path / "out")
    assert code == 1
    assert f"{tmp_path / 'b' / 'x.png'}: error:" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["x.html"]


def test_model_output_is_repaired_and_the_repairs_printed(checkpoint, sketches, tmp_path, capsys, monkeypatch):
    raw = '<main><div><p onclick="steal()">Hi<script>alert(1)</script></span>'

    def fake_generate(model, images, input_ids, attention_mask, config, tokenizer):
        assert images.shape[0] == input_ids.shape[0] == config.num_beams == 1
        return SimpleNamespace(texts=[raw] * images.shape[0])

    monkeypatch.setattr(vlm.generate, "generate", fake_generate)
    sketches[0].save(tmp_path / "x.png")
    assert run(checkpoint, tmp_path / "x.png") == 0
    page = (tmp_path / "x.html").read_text(encoding="utf-8")
    assert_valid_page(page)
    assert "<main><div><p>Hi</p></div></main>" in page
    assert "steal" not in page and "alert" not in page
    out = capsys.readouterr().out
    assert f"{tmp_path / 'x.png'}: repaired: removed attribute onclick on <p>, removed <script>, " in out
    assert "closed unclosed <div>" in out


def test_sketch_to_html_returns_one_valid_document_per_image(checkpoint, sketches):
    model, processor = vlm.load_model(checkpoint, verbose=False)
    pages = sketch_to_html(model, processor, sketches, max_new_tokens=12, num_beams=2)
    assert len(pages) == 2
    for page, problems in pages:
        assert_valid_page(page)
        assert all(isinstance(p, str) for p in problems)
    assert sketch_to_html(model, processor, []) == []


def test_one_sketch_alone_gives_the_page_it_gets_in_a_batch(checkpoint, sketches):
    # One sketch decodes with prompt-lookup drafts, a batch with plain greedy: same pages.
    model, processor = vlm.load_model(checkpoint, verbose=False)
    batched = sketch_to_html(model, processor, sketches, max_new_tokens=40)
    alone = [sketch_to_html(model, processor, [s], max_new_tokens=40)[0] for s in sketches]
    assert alone == batched


def test_render_without_chromium_exits_2_with_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLM_CHROMIUM", str(tmp_path / "no-such-browser"))
    (tmp_path / "x.png").write_bytes(b"")
    assert sketch2html.main([str(tmp_path / "x.png"), "--render"]) == 2
    assert "apt-get install chromium" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def real_chromium():
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if found is None:
        pytest.fail("Chromium is missing: --render needs it (CI installs it; locally: apt-get install chromium)")
    return found


def test_render_writes_a_screenshot_of_the_requested_size(checkpoint, sketches, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_CHROMIUM", real_chromium())
    sketches[0].save(tmp_path / "x.png")
    code = run(checkpoint, tmp_path / "x.png", "--render", "--width", "640", "--height", "480", "--out_dir", tmp_path)
    assert code == 0, capsys.readouterr().err
    shot = tmp_path / "x.page.png"
    assert shot.stat().st_size > 0
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.size == (640, 480)
    with Image.open(tmp_path / "x.png") as sketch:
        assert sketch.size == sketches[0].size  # the screenshot must not overwrite the sketch
    assert "wrote 1 pages (1 rendered), failed 0" in capsys.readouterr().out


def test_render_png_shows_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_CHROMIUM", real_chromium())
    page = tmp_path / "p.html"
    page.write_text(document("<header><h1>Acme</h1></header><main><p>Hello</p></main>"), encoding="utf-8")
    render.render_png(page, tmp_path / "p.png", width=320, height=240)
    with Image.open(tmp_path / "p.png") as image:
        image = image.convert("RGB")
        assert image.size == (320, 240)
        assert image.getpixel((300, 5)) == (0x2D, 0x3E, 0x50)  # the stylesheet's header colour
        assert image.getpixel((300, 230)) == (255, 255, 255)  # the body below
    assert sorted(os.listdir(tmp_path)) == ["p.html", "p.png"]
