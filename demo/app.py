"""The vlm Streamlit demo: ask about an image, caption a batch, turn a sketch into HTML.

streamlit run demo/app.py                  # the bundled model
VLM_DEMO_MODEL=runs/x/step-000500/model streamlit run demo/app.py
VLM_DEMO_MODELS=runs/a/model:runs/b/model streamlit run demo/app.py -- --model runs/c/model

Visitors choose only among the model folders the operator lists: ``VLM_DEMO_MODEL`` (the
default; unset means the bundled model), then ``VLM_DEMO_MODELS`` (``os.pathsep``
separated) and each ``--model`` after ``--``. A checkpoint folder rebuilds backbones from
the sources it names, so a typed path would let a visitor load anything on the server.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st
import streamlit.components.v1 as components

from vlm import load_model
from vlm.chat import Chat
from vlm.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from vlm.tasks import CAPTION, SKETCH, VQA, caption_images, sketch_to_html

if TYPE_CHECKING:
    from vlm import VLM, Processor
    from vlm.tasks import Task

EXAMPLES = Path(__file__).parent / "examples"
MAX_PIXELS = int(os.environ.get("VLM_DEMO_MAX_PIXELS", DEFAULT_MAX_PIXELS))
BUNDLED = "bundled model"
MAX_LOADED_MODELS = 2  # a real model holds ~0.6 GB: visitors switching models must not fill the memory

log = logging.getLogger(__name__)


def model_folders(argv: list[str] | None = None) -> list[str]:
    """The operator's model folders, the default first; "" is the bundled model."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", action="append", default=[])
    extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0].model
    listed = [*os.environ.get("VLM_DEMO_MODELS", "").split(os.pathsep), *extra]
    default = os.environ.get("VLM_DEMO_MODEL", "").strip()
    folders = [os.path.normpath(default) if default else ""]
    folders += [os.path.normpath(p.strip()) for p in listed if p.strip()]
    return list(dict.fromkeys(folders))


def allowed_models() -> dict[str, str]:
    """Display name → folder: each folder's name, with as many parent folders as tell them apart."""
    folders = model_folders()

    def names(depth: int) -> list[str]:
        return ["/".join(Path(f).parts[-depth:]) if f else BUNDLED for f in folders]

    depth, deepest = 1, max(len(Path(f).parts) for f in folders)
    while len(set(names(depth))) < len(folders) and depth < deepest:
        depth += 1
    return dict(zip(names(depth), folders))


@st.cache_resource(max_entries=MAX_LOADED_MODELS, show_spinner="Loading the model…")
def get_model(folder: str):
    # One model per allowed folder, shared by every session: it holds no per-request state.
    if folder not in allowed_models().values():
        raise ValueError("not one of the models this demo offers")
    return load_model(folder or None, verbose=False)


def short_reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def pick_model() -> tuple[VLM, Processor]:
    """The visitor's choice among the allowed models; if it does not load, say why and fall
    back to the model this session used before, else the default; stop when none loads."""
    models = allowed_models()
    names = list(models)
    choice = st.sidebar.selectbox("Model", names, key="model") if len(names) > 1 else names[0]
    if len(names) == 1:
        st.sidebar.caption(f"Model: {choice}")
    problem = ""
    for name in dict.fromkeys([choice, st.session_state.get("model_in_use"), names[0]]):
        if name not in models:  # no model used yet, or a selection that is not an option
            continue
        try:
            model, processor = get_model(models[name])
        except Exception as e:  # a broken folder fails in many ways: JSON, safetensors, shapes, types…
            log.warning("could not load the model %r from %r", name, models[name], exc_info=True)
            problem = problem or f"Could not load the model {choice!r} ({short_reason(e)})"
            continue
        if problem:
            st.error(f"{problem}. Using {name!r} instead.")
        st.session_state.model_in_use = name
        return model, processor
    st.error(f"{problem}.")
    st.stop()


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


def show_image(image, side: int) -> None:
    """Show the image within a side × side box; the model still gets the original.

    st.image scales what it gets down to the display width and re-encodes it: a side past
    65,535 px cannot be encoded and a very flat image rounds to 0 px high, so it gets a
    copy that already fits."""
    scale = min(1.0, side / image.width, side / image.height)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, reducing_gap=3.0)
    st.image(image, width=max(1, round(side * min(1.0, image.width / image.height))))


def prompt_tokens(chat: Chat, turns: list[tuple[str, str]], question: str) -> int:
    segments = VQA.conversation(chat.processor, turns, question, num_images=len(chat.images))
    return len(chat.processor.encode(segments)[0])


def fit_to_context(chat: Chat, question: str, max_new_tokens: int) -> int | None:
    """Drop the oldest turns until the prompt and the answer fit the LM's context; how many
    were dropped, or None (nothing dropped) when the question alone leaves no room.

    The first turn goes last, as its question often sets the topic; the image always stays,
    since the processor puts it before the first question that remains."""
    context = getattr(chat.model.lm.config, "max_position_embeddings", None)
    if not context:
        return 0
    turns = list(chat.turns)
    while prompt_tokens(chat, turns, question) + max_new_tokens > context:
        if not turns:
            return None
        del turns[1 if len(turns) > 1 else 0]
    dropped = len(chat.turns) - len(turns)
    chat.turns[:] = turns
    return dropped


def decoding_settings() -> dict:
    """The visitor's decoding choices shared by the tabs; each tab sets its own length, and
    everything else is its task's default (vlm/tasks.py), as in the command-line tools."""
    st.sidebar.header("Decoding")
    beams = st.sidebar.slider("Beams", 1, 4, 1)
    sample = st.sidebar.checkbox("Sample", value=False, disabled=beams > 1)
    temperature = st.sidebar.slider("Temperature", 0.1, 1.5, 0.7, disabled=not sample)
    top_p = st.sidebar.slider("Top-p", 0.1, 1.0, 0.9, disabled=not sample)
    return {"num_beams": beams, "do_sample": sample and beams == 1, "temperature": temperature, "top_p": top_p}


def max_new_tokens(task: Task, key: str, most: int = 512) -> int:
    """The tab's answer length, starting at its task's default."""
    return st.slider("Max new tokens", 8, most, task.decoding.max_new_tokens, step=8, key=f"{key}-max-new")


def ask_tab(model, processor, settings: dict) -> None:
    cfg = VQA.generation_config(max_new_tokens=max_new_tokens(VQA, "ask"), **settings)
    picked = pick_image("ask", "shapes.png")
    if picked is None:
        st.info("Pick an example or upload an image to start a conversation.")
        return
    identity, image = picked
    # One Chat per image, model and browser session: the image is encoded once per conversation.
    if st.session_state.get("chat_id") != identity or st.session_state.chat.model is not model:
        st.session_state.chat_id = identity
        st.session_state.chat = Chat(model, processor, [image])
    chat: Chat = st.session_state.chat
    show_image(image, 256)
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
    dropped = fit_to_context(chat, question, cfg.max_new_tokens)
    if dropped is None:
        st.error(
            f"The question is too long: with an answer of up to {cfg.max_new_tokens} tokens it does not fit "
            "the model's context. Ask a shorter question or lower Max new tokens."
        )
        return
    with history:
        if dropped:
            st.info(f"The oldest {dropped} turn(s) were left out to fit the model's context; the image stays.")
        st.chat_message("user").write(question)
        if cfg.num_beams > 1:
            st.chat_message("assistant").write(chat.ask(question, cfg))
        else:
            st.chat_message("assistant").write_stream(chat.ask_stream(question, cfg))


def caption_tab(model, processor, settings: dict) -> None:
    cfg = CAPTION.generation_config(max_new_tokens=max_new_tokens(CAPTION, "caption"), **settings)
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


def sketch_tab(model, processor, settings: dict) -> None:
    max_new = max_new_tokens(SKETCH, "sketch", 1024)
    picked = pick_image("sketch", "sketch.png")
    if picked is None:
        st.info("Pick the example sketch or upload a drawing of a page layout.")
        return
    _, image = picked
    show_image(image, 320)
    if not st.button("Generate HTML"):
        return
    with st.spinner("Writing the page…"):
        page, problems = sketch_to_html(model, processor, [image], max_new, settings["num_beams"])[0]
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
    model, processor = pick_model()
    settings = decoding_settings()
    tabs = st.tabs(["Ask", "Caption", "Sketch → HTML"])
    for tab, show in zip(tabs, (ask_tab, caption_tab, sketch_tab)):
        with tab:
            try:
                show(model, processor, settings)
            except (ImageError, ValueError) as e:
                st.error(f"That did not work: {e}")


main()
