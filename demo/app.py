"""The vlm Streamlit demo: ask about an image, caption a batch, turn a sketch into HTML.

streamlit run demo/app.py                  # the bundled model
VLM_DEMO_MODEL=runs/x/step-000500/model streamlit run demo/app.py
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import os
from pathlib import Path

import streamlit as st
import streamlit.components.v1 as components

from vlm import load_model
from vlm.apps.caption import caption_images
from vlm.apps.sketch2html import sketch_to_html
from vlm.chat import Chat
from vlm.generate import GenerationConfig
from vlm.images import DEFAULT_MAX_PIXELS, ImageError, load_image

EXAMPLES = Path(__file__).parent / "examples"
MAX_PIXELS = int(os.environ.get("VLM_DEMO_MAX_PIXELS", DEFAULT_MAX_PIXELS))


@st.cache_resource(show_spinner="Loading the model…")
def get_model(path: str):
    # One model per process, shared by every session: it holds no per-request state.
    return load_model(path or None, verbose=False)


def example_names() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.png"))


def read_upload(upload) -> tuple[bytes, object]:
    """(bytes, RGB image), or show the reason in the page and return (bytes, None)."""
    data = upload.getvalue()
    try:
        return data, load_image(data, MAX_PIXELS)
    except ImageError as e:
        st.error(f"{upload.name}: {e.reason}. Please upload a PNG, JPEG or WebP image.")
        return data, None


def pick_image(key: str, default: str) -> tuple[str, object] | None:
    """An example or an uploaded image; returns (identity, image) or None."""
    source = st.radio("Image", ["Example", "Upload"], horizontal=True, key=f"{key}-source")
    if source == "Example":
        names = example_names()
        name = st.selectbox("Example", names, index=names.index(default) if default in names else 0, key=f"{key}-ex")
        return f"example:{name}", load_image(EXAMPLES / name)
    upload = st.file_uploader("Upload an image", key=f"{key}-upload")
    if upload is None:
        return None
    data, image = read_upload(upload)
    if image is None:
        return None
    return "upload:" + hashlib.sha256(data).hexdigest(), image


def decoding_settings() -> GenerationConfig:
    st.sidebar.header("Decoding")
    max_new = st.sidebar.slider("Max new tokens", 8, 512, 96, step=8)
    beams = st.sidebar.slider("Beams", 1, 4, 1)
    sample = st.sidebar.checkbox("Sample", value=False, disabled=beams > 1)
    temperature = st.sidebar.slider("Temperature", 0.1, 1.5, 0.7, disabled=not sample)
    top_p = st.sidebar.slider("Top-p", 0.1, 1.0, 0.9, disabled=not sample)
    return GenerationConfig(
        max_new_tokens=max_new,
        num_beams=beams,
        do_sample=sample and beams == 1,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=1.1,
    )


def ask_tab(model, processor, cfg: GenerationConfig) -> None:
    picked = pick_image("ask", "shapes.png")
    if picked is None:
        st.info("Pick an example or upload an image to start a conversation.")
        return
    identity, image = picked
    # One Chat per image and browser session: the image is encoded once per conversation.
    if st.session_state.get("chat_id") != identity:
        st.session_state.chat_id = identity
        st.session_state.chat = Chat(model, processor, [image])
    chat: Chat = st.session_state.chat
    st.image(image, width=256)
    if st.button("New conversation"):
        st.session_state.chat = chat = Chat(model, processor, [image])
    history = st.container()  # above the input box, where new turns appear too
    with history:
        for question, answer in chat.turns:
            st.chat_message("user").write(question)
            st.chat_message("assistant").write(answer)
    question = st.chat_input("Ask about the image")
    if question is None:
        return
    if not question.strip():
        st.warning("The question is empty: type something to ask.")
        return
    with history:
        st.chat_message("user").write(question)
        if cfg.num_beams > 1:
            st.chat_message("assistant").write(chat.ask(question, cfg))
        else:
            st.chat_message("assistant").write_stream(chat.ask_stream(question, cfg))


def caption_tab(model, processor, cfg: GenerationConfig) -> None:
    uploads = st.file_uploader("Images to caption", accept_multiple_files=True, key="caption-upload")
    if not uploads:
        st.info("Upload one or more images.")
        return
    if not st.button("Caption them"):
        return
    rows, good = [], []
    for upload in uploads:
        _, image = read_upload(upload)
        rows.append({"file": upload.name, "caption": "", "error": "" if image is not None else "unreadable image"})
        if image is not None:
            good.append((len(rows) - 1, image))
    if good:
        with st.spinner(f"Captioning {len(good)} images…"):
            captions = caption_images(model, processor, [img for _, img in good], None, cfg)
        for (i, _), text in zip(good, captions):
            rows[i]["caption"] = text
    st.dataframe(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "caption", "error"])
    writer.writeheader()
    writer.writerows(rows)
    st.download_button("Download CSV", buf.getvalue(), file_name="captions.csv", mime="text/csv")


def sketch_tab(model, processor, cfg: GenerationConfig) -> None:
    picked = pick_image("sketch", "sketch.png")
    if picked is None:
        st.info("Pick the example sketch or upload a drawing of a page layout.")
        return
    _, image = picked
    st.image(image, width=320)
    if not st.button("Generate HTML"):
        return
    with st.spinner("Writing the page…"):
        page, problems = sketch_to_html(model, processor, [image], max(cfg.max_new_tokens, 256), cfg.num_beams)[0]
    if problems:
        st.warning("The generated HTML was repaired: " + "; ".join(problems))
    left, right = st.columns(2)
    left.code(page, language="html")
    with right:
        # A sandboxed iframe with no permissions: no scripts, no same-origin access; the
        # page's own Content-Security-Policy also forbids scripts and network requests.
        components.html(
            f'<iframe sandbox="" srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:560px;border:1px solid #ccc"></iframe>',
            height=580,
        )
    st.download_button("Download HTML", page, file_name="page.html", mime="text/html")


def main() -> None:
    st.set_page_config(page_title="vlm demo", layout="wide")
    st.title("vlm demo")
    path = st.sidebar.text_input("Model folder (empty: bundled model)", os.environ.get("VLM_DEMO_MODEL", ""))
    try:
        model, processor = get_model(path.strip())
    except (OSError, ValueError) as e:
        st.error(f"Could not load the model from {path!r}: {e}")
        st.stop()
    cfg = decoding_settings()
    tabs = st.tabs(["Ask", "Caption", "Sketch → HTML"])
    for tab, show in zip(tabs, (ask_tab, caption_tab, sketch_tab)):
        with tab:
            try:
                show(model, processor, cfg)
            except (ImageError, ValueError) as e:
                st.error(f"That did not work: {e}")


main()
