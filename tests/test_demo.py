"""The Streamlit demo, driven through Streamlit's testing API and in a real browser."""

import io
import os
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

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "demo" / "app.py")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def app(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("VLM_DEMO_MODEL", str(tiny_checkpoint))
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


def test_ask_tab_answers_and_keeps_the_conversation(app):
    assert [t.label for t in app.tabs] == ["Ask", "Caption", "Sketch → HTML"]
    app.chat_input[0].set_value("what colour is the shape?").run()
    assert not app.exception, app.exception
    assert len(app.chat_message) == 2
    assert app.chat_message[0].markdown[0].value == "what colour is the shape?"
    chat = app.session_state["chat"]
    assert len(chat.turns) == 1 and chat.turns[0][1] == chat.turns[0][1].strip()
    latents = chat.session.latents
    app.chat_input[0].set_value("and its shape?").run()
    assert len(app.chat_message) == 4
    assert app.session_state["chat"].session.latents is latents  # encoded once per conversation


def test_empty_question_gets_a_message(app):
    app.chat_input[0].set_value("   ").run()
    assert any("question is empty" in w.value for w in app.warning)
    assert len(app.chat_message) == 0


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


def test_caption_tab_makes_a_table_and_a_csv(app):
    files = [("a.png", _png(color="red"), "image/png"), ("b.txt", b"nope", "text/plain")]
    app.file_uploader(key="caption-upload").set_value(files).run()
    app.button[[b.label for b in app.button].index("Caption them")].click().run()
    assert not app.exception, app.exception
    frame = app.dataframe[0].value
    assert list(frame["file"]) == ["a.png", "b.txt"]
    assert frame["error"][0] == "" and frame["error"][1] == "unreadable image"
    assert any("b.txt" in e.value for e in app.error)


def test_sketch_tab_shows_code_and_a_sandboxed_preview(app):
    app.button[[b.label for b in app.button].index("Generate HTML")].click().run()
    assert not app.exception, app.exception
    code = app.code[0].value
    assert code.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in code
    assert "<script" not in code


def test_each_tab_starts_from_its_tasks_decoding_defaults(app):
    from vlm.tasks import CAPTION, SKETCH, VQA

    for key, task in (("ask", VQA), ("caption", CAPTION), ("sketch", SKETCH)):
        assert app.slider(key=f"{key}-max-new").value == task.decoding.max_new_tokens, key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_browser_renders_the_app_and_answers(tiny_checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: scripts/setup.sh installs it (apt-get install chromium)"
    port = _free_port()
    env = {**os.environ, "VLM_DEMO_MODEL": str(tiny_checkpoint), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port),
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            box = page.get_by_placeholder("Ask about the image")
            box.wait_for(timeout=90_000)
            title = page.title()
            tabs = [t.inner_text() for t in page.get_by_role("tab").all()]
            box.fill("what colour is it?")
            box.press("Enter")
            messages = page.locator('[data-testid="stChatMessage"]')
            messages.nth(1).wait_for(timeout=90_000)
            texts = [m.inner_text() for m in messages.all()]
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert title == "vlm demo"
    assert tabs == ["Ask", "Caption", "Sketch → HTML"]
    assert "what colour is it?" in texts[0] and len(texts) == 2
    image = Image.open(shot)
    assert image.size == (1280, 900)
    assert len(set(image.convert("L").getdata())) > 10  # a drawn page, not a blank one
