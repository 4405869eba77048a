"""The Streamlit demo, driven through Streamlit's testing API and in a real browser."""

import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from conftest import make_checkpoint
from PIL import Image
from streamlit.testing.v1 import AppTest

from demo.html_view import format_body
from vlm.chat import Chat

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "demo" / "app.py")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def app(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_DEMO_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("VLM_DEMO_FEEDBACK", str(tmp_path / "feedback"))
    monkeypatch.setattr(sys, "argv", [APP])
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _png(size=(48, 48), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png_header() -> bytes:
    """A tiny PNG file whose header claims 60,000 × 60,000 pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def click(at: AppTest, label: str) -> AppTest:
    [button] = [b for b in at.button if b.label == label]
    button.click().run()
    assert not at.exception, at.exception
    return at


def ask(at: AppTest, question: str) -> AppTest:
    at.chat_input[0].set_value(question).run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("remember", [False, True])
def test_ask_tab_answers_and_keeps_the_conversation(app, remember, monkeypatch):
    from vlm.model import VLM

    encoded = []
    encode = VLM.encode_images
    monkeypatch.setattr(VLM, "encode_images", lambda self, px: encoded.append(px.shape) or encode(self, px))
    assert [t.label for t in app.tabs] == ["Ask", "Caption", "Sketch → HTML"]
    if remember:
        app.checkbox(key="ask-remember").check().run()
    ask(app, "what colour is the shape?")
    assert len(app.chat_message) == 2
    assert app.chat_message[0].markdown[0].value == "what colour is the shape?"
    chat = app.session_state["chat"]
    assert chat.engine is not None and chat.engine.running  # answers decode on the shared engine
    assert len(chat.turns) == 1 and chat.turns[0][1] == chat.turns[0][1].strip()
    ask(app, "and its shape?")
    assert len(app.chat_message) == 4  # every turn stays on the page
    chat = app.session_state["chat"]
    assert len(encoded) == 1  # the image is encoded once per conversation
    # What the model saw: the earlier turn only when asked to (the bundled model was
    # trained on single questions).
    assert [q for q, _ in chat.turns] == (["what colour is the shape?"] if remember else []) + ["and its shape?"]
    assert app.session_state["ask_log"][1]["turns"] == ([list(chat.turns[0])] if remember else [])


def test_an_answer_shows_its_time_to_first_token_speed_and_exact_token_count(app):
    from vlm.generate import generate
    from vlm.tasks import VQA

    ask(app, "what colour is the shape?")
    entry = app.session_state["ask_log"][0]
    timing = entry["timing"]
    assert 0 < timing["first_token_s"] <= timing["seconds"]
    lines = [c.value for c in app.chat_message[1].caption]
    assert any(line.startswith("first token ") and f" · {timing['tokens']} tokens" in line for line in lines), lines
    # The same question asked afresh, counting generate's own tokens: the count is exact,
    # also for an answer cut off at its length limit (the tiny model's usually is).
    chat = app.session_state["chat"]
    model, processor = chat.model, chat.processor
    cfg = VQA.generation_config(model)
    input_ids, images = Chat(model, processor, chat.images)._prompt("what colour is the shape?")
    result = generate(model, images, input_ids, config=cfg, tokenizer=processor.tokenizer)
    assert timing["tokens"] == len(result.tokens[0])
    assert entry["answer"] == result.texts[0].strip()
    assert entry["decoding"]["max_new_tokens"] == cfg.max_new_tokens


def test_an_examples_suggested_questions_are_one_click_away(app):
    example = json.loads((ROOT / "demo" / "examples" / "examples.json").read_text())["ask"][0]
    assert app.selectbox(key="ask-ex").value == example["title"]
    assert any(example["source"] == c.value for c in app.caption)
    click(app, example["questions"][1])
    assert app.chat_message[0].markdown[0].value == example["questions"][1]
    assert app.session_state["chat"].turns[0][0] == example["questions"][1]


def test_every_example_is_listed_with_its_source():
    listed = json.loads((ROOT / "demo" / "examples" / "examples.json").read_text())
    assert set(listed) == {"ask", "sketch"}
    for items in listed.values():
        for example in items:
            assert (ROOT / "demo" / "examples" / example["file"]).is_file()
            assert example["title"] and example["source"]
    for example in listed["ask"]:
        assert len(example["questions"]) == len(example["answers"]) >= 2
        with Image.open(ROOT / "demo" / "examples" / example["file"]) as image:
            assert image.size == (64, 64)  # easy-VQA's size, what the bundled model knows


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.txt", b"this is not an image", "not a readable image"),
        ("broken.png", _png()[:40], "not a readable image"),
        ("huge.png", _huge_png_header(), "image too large"),
    ],
)
def test_bad_uploads_show_a_message_not_a_traceback(app, name, data, message):
    app.radio(key="ask-source").set_value("Upload").run()
    app.file_uploader(key="ask-upload").set_value((name, data, "application/octet-stream")).run()
    assert not app.exception, app.exception
    assert any(message in e.value and name in e.value for e in app.error), [e.value for e in app.error]


def test_empty_question_gets_a_message(app):
    ask(app, "   ")
    assert any("question is empty" in w.value for w in app.warning)
    assert len(app.chat_message) == 0


def _captions_table(at: AppTest) -> list[str]:
    assert not at.exception, at.exception
    return list(at.dataframe[0].value["caption"]) if len(at.dataframe) else []


def test_caption_tab_makes_a_table_and_a_csv(app):
    files = [("a.png", _png(color="red"), "image/png"), ("b.txt", b"nope", "text/plain")]
    app.file_uploader(key="caption-upload").set_value(files).run()
    click(app, "Caption them")
    frame = app.dataframe[0].value
    assert list(frame["file"]) == ["a.png", "b.txt"]
    assert frame["error"][0] == "" and frame["error"][1] == "unreadable image"
    assert any("b.txt" in e.value for e in app.error)
    assert [d.label for d in app.download_button] == ["Download CSV"]


def test_results_survive_a_rerun_a_control_and_a_download_click(app):
    ask(app, "what colour is the shape?")
    app.file_uploader(key="caption-upload").set_value([("a.png", _png(color="red"), "image/png")]).run()
    click(app, "Caption them")
    captions = _captions_table(app)
    click(app, "Generate HTML")
    page = app.session_state["sketch"]["page"]

    def unchanged(at: AppTest) -> None:
        assert _captions_table(at) == captions and len(captions) == 1
        assert len(at.chat_message) == 2
        assert any(c.value == page.strip() for c in at.code)  # the whole document, in its expander

    app.run()
    unchanged(app)
    for label in ("Download CSV", "Download HTML"):
        [download] = [d for d in app.download_button if d.label == label]
        download.click().run()  # the browser does not even rerun (on_click="ignore"); AppTest does
        unchanged(app)
    app.slider(key="sketch-beams").set_value(2).run()  # any control reruns the app
    unchanged(app)


def test_sketch_tab_streams_the_body_shows_it_laid_out_and_offers_the_whole_document(app):
    click(app, "Generate HTML")
    entry = app.session_state["sketch"]
    body, page = entry["answer"], entry["page"]
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page and f"<body>{body}</body>" in page
    assert "<script" not in page
    codes = [c.value for c in app.code]  # st.code drops a final newline
    # The example's reference page, then the model's body laid out, then the whole document.
    example = json.loads((ROOT / "demo" / "examples" / "examples.json").read_text())["sketch"][0]
    assert codes.index(format_body(example["reference"])) < codes.index(entry["shown"] or "(empty)")
    assert codes.index(entry["shown"] or "(empty)") < codes.index(page.strip())
    assert re.sub(r">\s+<", "><", entry["shown"]) == body
    assert [d.label for d in app.download_button] == ["Download HTML"]
    frames = [e for e in app.get("iframe")]
    assert frames and 'sandbox=""' in frames[0].proto.srcdoc
    assert any(c.value.startswith("first token ") for c in app.caption)


def test_body_html_is_laid_out_one_element_a_line_and_compacts_back():
    body = (
        "<nav><a>News</a><a>Q&amp;A</a></nav><main><form><label>Name<input></label><button>Go</button></form>"
        '<section class="row"><div class="card"><h3>Pro</h3></div></section><img alt="map"></main>'
    )
    assert format_body(body).splitlines() == [
        "<nav>",
        "  <a>News</a>",
        "  <a>Q&amp;A</a>",
        "</nav>",
        "<main>",
        "  <form>",
        "    <label>Name<input></label>",  # an element holding text stays on one line
        "    <button>Go</button>",
        "  </form>",
        '  <section class="row">',
        '    <div class="card">',
        "      <h3>Pro</h3>",
        "    </div>",
        "  </section>",
        '  <img alt="map">',
        "</main>",
    ]
    assert re.sub(r">\s+<", "><", format_body(body)) == body
    assert format_body("text <b>outside</b> any element") == "text <b>outside</b> any element"


def test_the_sketch_prompt_is_the_sketch_tasks_own(tiny_checkpoint):
    """The sketch tab streams through a Chat whose one question is the sketch prompt."""
    import vlm
    from vlm.tasks import SKETCH, SKETCH_PROMPT, VQA

    _, processor = vlm.from_pretrained(tiny_checkpoint, verbose=False)
    assert VQA.conversation(processor, [], SKETCH_PROMPT) == SKETCH.prompt(processor)


def test_the_model_panel_names_the_checkpoint(app, tiny_checkpoint):
    [panel] = [e for e in app.expander if e.label.startswith("Model: ")]
    assert panel.label.startswith("Model: ckpt")
    text = " ".join(m.value for m in panel.markdown)
    assert "Checkpoint:" in text and "ckpt" in text and "Trained parameters" in text


def test_the_bundled_models_card_gives_the_panel_its_data_results_and_limits():
    from demo.model_card import SECTIONS, read_card
    from vlm.factory import DEFAULT_CHECKPOINT

    card = read_card(DEFAULT_CHECKPOINT, "bundled model")
    assert card.has_card and card.title.startswith("vlm default")
    assert list(card.sections) == list(SECTIONS)
    assert "easy-VQA" in card.sections["Training data"] and "99.1 %" in card.sections["Results"]
    assert "](../" not in "".join(card.sections.values())  # links into the checkout become text
    assert ("Trained parameters", "24,299,144") in card.facts


def test_the_sketch_adapters_card_gives_the_panel_its_data_results_and_limits():
    from demo.model_card import SECTIONS, read_card
    from vlm.factory import TASK_CHECKPOINTS

    card = read_card(TASK_CHECKPOINTS["sketch"], "sketch adapter")
    assert card.has_card and card.title.startswith("vlm sketch")
    assert list(card.sections) == list(SECTIONS)
    assert "structure exact" in card.sections["Results"] and "sketch" in card.sections["Training data"]
    assert ("Trained parameters", "24,557,192") in card.facts


def test_each_tab_starts_from_its_tasks_decoding_defaults(app):
    from vlm.tasks import CAPTION, SKETCH, VQA

    model = app.session_state["chat"].model
    for key, task in (("ask", VQA), ("caption", CAPTION), ("sketch", SKETCH)):
        cfg = task.generation_config(model)
        assert app.slider(key=f"{key}-max-new").value == cfg.max_new_tokens, key
        assert app.slider(key=f"{key}-beams").value == cfg.num_beams, key
        assert app.checkbox(key=f"{key}-sample").value == cfg.do_sample, key
        assert app.slider(key=f"{key}-temp").value == cfg.temperature, key
        assert app.slider(key=f"{key}-top-p").value == cfg.top_p, key


def test_a_checkpoints_generation_config_sets_the_demos_defaults(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "tuned"
    shutil.copytree(tiny_checkpoint, folder)
    saved = {"tasks": {"vqa": {"max_new_tokens": 12}, "sketch": {"max_new_tokens": 96, "prompt_lookup": 4}}}
    (folder / "generation_config.json").write_text(json.dumps(saved))
    monkeypatch.setenv("VLM_DEMO_MODEL", str(folder))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert at.slider(key="ask-max-new").value == 12
    assert at.slider(key="sketch-max-new").value == 96
    ask(at, "what colour is the shape?")
    assert at.session_state["ask_log"][0]["timing"]["tokens"] <= 12
    assert at.session_state["ask_log"][0]["decoding"]["max_new_tokens"] == 12


def test_visitors_get_the_viewers_menu_only():
    """No Deploy button, no rerun or clear-cache entries: a script-level Streamlit config."""
    import tomllib

    config = tomllib.loads((ROOT / "demo" / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] == "viewer"


@pytest.mark.slow
def test_the_bundled_model_answers_the_default_examples_suggested_questions(monkeypatch):
    """The demo as a newcomer starts it: the bundled model, the default example, and each
    question the page suggests for it, answered as easy-VQA's test set says."""
    monkeypatch.delenv("VLM_DEMO_MODEL", raising=False)
    monkeypatch.delenv("VLM_DEMO_MODELS", raising=False)
    monkeypatch.setenv("VLM_DEMO_FEEDBACK", "off")
    example = json.loads((ROOT / "demo" / "examples" / "examples.json").read_text())["ask"][0]
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert [e for e in at.expander if e.label.startswith("Model: bundled model — vlm default")]
    for question in example["questions"]:  # one conversation, as a visitor clicks them
        click(at, question)
    answers = [e["answer"] for e in at.session_state["ask_log"]]
    assert answers == example["answers"], list(zip(example["questions"], answers))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_browser_renders_the_app_answers_and_keeps_results(tiny_checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: scripts/setup.sh installs it (apt-get install chromium)"
    port = _free_port()
    feedback = tmp_path / "feedback"
    env = {**os.environ, "VLM_DEMO_MODEL": str(tiny_checkpoint), "VLM_DEMO_FEEDBACK": str(feedback),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port),
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]  # fmt: skip
    # Started from another folder: the demo's own .streamlit/config.toml still applies.
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shot = tmp_path / "demo.png"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Streamlit server did not come up")
        flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=flags)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.goto(f"http://127.0.0.1:{port}/")
            box = page.get_by_placeholder("Ask about the image")
            box.wait_for(timeout=90_000)
            title = page.title()
            tabs = [t.inner_text() for t in page.get_by_role("tab").all()]
            deploy = page.locator('[data-testid="stAppDeployButton"]').count()
            page.locator('[data-testid="stMainMenu"]').click()
            menu = page.locator('[data-testid="stMainMenuPopover"]').inner_text()
            page.keyboard.press("Escape")
            box.fill("what colour is it?")
            box.press("Enter")
            messages = page.locator('[data-testid="stChatMessage"]')
            messages.nth(1).get_by_text("first token").wait_for(timeout=90_000)
            texts = [m.inner_text() for m in messages.all()]
            messages.nth(1).get_by_label("Thumbs up").click()
            page.get_by_text("Feedback saved").wait_for(timeout=30_000)
            page.screenshot(path=str(shot))

            page.get_by_role("tab", name="Sketch → HTML").click()
            page.get_by_role("button", name="Generate HTML").click()
            download = page.get_by_role("button", name="Download HTML")
            download.wait_for(timeout=120_000)
            codes = page.locator('[data-testid="stCode"]').count()
            with page.expect_download() as saved:
                download.click()
            page.wait_for_timeout(2000)  # a rerun would have cleared the page by now
            after = page.locator('[data-testid="stCode"]').count()
            name, document = saved.value.suggested_filename, Path(saved.value.path()).read_text()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert title == "vlm demo"
    assert tabs == ["Ask", "Caption", "Sketch → HTML"]
    assert deploy == 0 and "Clear cache" not in menu and "Rerun" not in menu, menu  # the viewer's menu
    assert "what colour is it?" in texts[0] and len(texts) == 2
    assert "first token" in texts[1] and " tokens" in texts[1]
    image = Image.open(shot)
    assert image.size == (1280, 900)
    assert len(set(image.convert("L").getdata())) > 10  # a drawn page, not a blank one
    records = [json.loads(line) for line in (feedback / "feedback.jsonl").read_text().splitlines()]
    assert [(r["task"], r["rating"], r["question"]) for r in records] == [("vqa", "up", "what colour is it?")]
    assert codes == after >= 2 and name == "page.html" and document.startswith("<!DOCTYPE html>")


def test_the_sketch_tab_uses_the_bundled_sketch_adapter_on_the_bundled_models_backbones(tmp_path, monkeypatch):
    import streamlit as st
    import torch

    import vlm
    from vlm import factory

    default = make_checkpoint(tmp_path / "default", gates=0.5)
    model, _ = vlm.from_pretrained(default, verbose=False)
    with torch.no_grad():  # another adapter: its own cross-attention weights
        for layer in model.decoder_layers():
            if layer.xattn is not None:
                for p in layer.xattn.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    sketch = vlm.save_pretrained(model, tmp_path / "sketch")
    monkeypatch.setattr(factory, "DEFAULT_CHECKPOINT", default)
    monkeypatch.setattr(factory, "TASK_CHECKPOINTS", {"sketch": sketch})
    monkeypatch.setenv("VLM_DEMO_FEEDBACK", "off")
    monkeypatch.setattr(sys, "argv", [APP])
    loads = []

    def recording_load_model(path=None, **kwargs):
        loaded = factory.load_model(path, **kwargs)
        loads.append((path, kwargs, loaded))
        return loaded

    monkeypatch.setattr(vlm, "load_model", recording_load_model)

    def sketch_answer(model_env: str | None) -> dict:
        st.cache_resource.clear()
        if model_env is None:
            monkeypatch.delenv("VLM_DEMO_MODEL", raising=False)
        else:
            monkeypatch.setenv("VLM_DEMO_MODEL", model_env)
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        assert not at.exception, at.exception
        return click(at, "Generate HTML").session_state["sketch"]

    try:
        bundled = sketch_answer(None)
        assert bundled["model"] == {"name": "bundled model (sketch adapter)", "path": str(sketch)}
        # One load of the bundled model, then the adapter on its very backbones.
        (_, _, base), (_, adapter_kwargs, (adapter, _)) = loads
        assert adapter_kwargs["task"] == "sketch" and adapter_kwargs["share"] is base
        assert adapter.lm.get_input_embeddings().weight is base[0].lm.get_input_embeddings().weight
        # The same page as with the adapter's folder picked by hand (--model wins over the
        # task's default), and not the default adapter's page.
        assert sketch_answer(str(sketch))["raw"] == bundled["raw"]
        assert sketch_answer(str(default))["raw"] != bundled["raw"]
    finally:
        st.cache_resource.clear()
