"""The vlm Streamlit demo: ask about an image, caption a batch, turn a sketch into HTML,
and rate or correct what the model gave.

streamlit run demo/app.py                  # the bundled model
VLM_DEMO_MODEL=runs/x/step-000500/model streamlit run demo/app.py
VLM_DEMO_MODELS=runs/a/model:runs/b/model streamlit run demo/app.py -- --model runs/c/model
VLM_DEMO_FEEDBACK=/srv/feedback streamlit run demo/app.py   # or -- --feedback DIR; "off": none kept
streamlit run demo/app.py -- --device cuda --dtype bfloat16   # default auto: CUDA and bf16 when present

Visitors choose only among the model folders the operator lists: ``VLM_DEMO_MODEL`` (the
default; unset means the bundled model), then ``VLM_DEMO_MODELS`` (``os.pathsep``
separated) and each ``--model`` after ``--``. A checkpoint folder rebuilds backbones from
the sources it names, so a typed path would let a visitor load anything on the server.

Ratings (👍 / 👎) and corrections go to the feedback folder (``feedback/`` in the working
directory unless set) through :mod:`vlm.feedback`; ``vlm data feedback`` turns them into
training shards. Results live in ``st.session_state``, so reruns (a sidebar control, a
download) keep them. Decoding starts from each task's defaults for the loaded checkpoint
(``Task.generation_config(model)``), as in the command-line tools.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st
from html_view import format_body
from model_card import read_card
from timing import Timing, timed_stream

from vlm import load_model
from vlm.apps import LM_WEIGHTS
from vlm.chat import Chat
from vlm.engine import Engine, EngineConfig
from vlm.factory import DEFAULT_CHECKPOINT, task_checkpoint
from vlm.feedback import FeedbackLog, Record
from vlm.html import document, repair_html
from vlm.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from vlm.tasks import CAPTION, SKETCH, SKETCH_PROMPT, VQA, caption_images

if TYPE_CHECKING:
    from vlm import VLM, Processor
    from vlm.generate import GenerationConfig
    from vlm.tasks import Task

EXAMPLES = Path(__file__).parent / "examples"
MANIFEST = EXAMPLES / "examples.json"
MAX_PIXELS = int(os.environ.get("VLM_DEMO_MAX_PIXELS", DEFAULT_MAX_PIXELS))
BUNDLED = "bundled model"
MAX_LOADED_MODELS = 2  # a real model holds ~0.6 GB: visitors switching models must not fill the memory
FEEDBACK_OFF = ("off", "none", "no")
RATING = {0: "down", 1: "up"}  # st.feedback("thumbs") values

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the operator's options


def demo_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's own arguments (after ``--`` on the ``streamlit run`` line)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--feedback")
    parser.add_argument("--device", default="auto")  # as every inference command's (vlm.apps)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lm_weights", choices=LM_WEIGHTS, default="auto")  # float32 turns fp16 weights off
    return parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0]


def model_folders(argv: list[str] | None = None) -> list[str]:
    """The operator's model folders, the default first; "" is the bundled model."""
    extra = demo_options(argv).model
    listed = [*os.environ.get("VLM_DEMO_MODELS", "").split(os.pathsep), *extra]
    default = os.environ.get("VLM_DEMO_MODEL", "").strip()
    folders = [os.path.normpath(default) if default else ""]
    folders += [os.path.normpath(p.strip()) for p in listed if p.strip()]
    return list(dict.fromkeys(folders))


def feedback_folder(argv: list[str] | None = None) -> Path | None:
    """Where ratings and corrections go: ``--feedback DIR``, else ``$VLM_DEMO_FEEDBACK``,
    else ``feedback/`` in the working directory; None when set to ``off``."""
    chosen = demo_options(argv).feedback or os.environ.get("VLM_DEMO_FEEDBACK", "").strip() or "feedback"
    return None if chosen.lower() in FEEDBACK_OFF else Path(chosen)


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
    options = demo_options()
    return load_model(
        folder or None, verbose=False, device=options.device, dtype=options.dtype, lm_weights=options.lm_weights
    )


@st.cache_resource(max_entries=MAX_LOADED_MODELS, show_spinner=False, on_release=Engine.shutdown)
def get_engine(model_id: int, _model: VLM, _tokenizer) -> Engine:
    # One engine per loaded model (keyed by the model object: a reloaded model gets its own):
    # every visitor's Ask tab decodes in its batched steps, on one thread, instead of one
    # thread per visitor competing for the CPU. Released with the model's cache entry.
    return Engine(_model, _tokenizer, EngineConfig(max_concurrent=8)).start()


@st.cache_resource(max_entries=2, show_spinner="Loading the task's adapter…")
def get_task_model(task: str):
    # The bundled adapter of a task on the bundled model's frozen tower and LM, tensor for
    # tensor: a second adapter, not a second copy of the backbones.
    options = demo_options()
    return load_model(
        None, verbose=False, device=options.device, dtype=options.dtype, task=task, share=get_model(""),
        lm_weights=options.lm_weights,
    )  # fmt: skip


def for_task(task: str, model: VLM, processor: Processor, name: str) -> tuple[VLM, Processor, str]:
    """The model a task's tab uses: the task's bundled adapter (``vlm/weights/sketch``) when
    the visitor picked the bundled model and one is there; otherwise the model picked."""
    if allowed_models().get(name) != "" or task_checkpoint(task) is None:
        return model, processor, name
    task_model, task_processor = get_task_model(task)
    return task_model, task_processor, adapter_name(task)


def adapter_name(task: str) -> str:
    return f"{BUNDLED} ({task} adapter)"


def short_reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def pick_model() -> tuple[VLM, Processor, str]:
    """The visitor's choice among the allowed models and its name; if it does not load, say
    why and fall back to the model this session used before, else the default; stop when
    none loads."""
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
        return model, processor, name
    st.error(f"{problem}.")
    st.stop()


def model_path(name: str) -> Path:
    for task in ("sketch",):
        if name == adapter_name(task) and task_checkpoint(task) is not None:
            return task_checkpoint(task)
    folder = allowed_models()[name]
    return Path(folder) if folder else DEFAULT_CHECKPOINT


def model_panel(name: str) -> None:
    """What is loaded, what it was trained on, how it measures, where it fails."""
    card = read_card(model_path(name), name)
    with st.expander(f"Model: {name} — {card.title}", expanded=False):
        if card.summary:
            st.markdown(card.summary)
        st.markdown("\n".join(f"- **{what}:** {plain(value)}" for what, value in card.facts))
        if card.sections:
            for tab, (title, text) in zip(st.tabs(list(card.sections)), card.sections.items()):
                with tab:
                    st.markdown(text)
                    st.caption(f"From the model card, {model_path(name) / 'README.md'} ({title}).")


# ---------------------------------------------------------------------- images and examples


@st.cache_data
def examples() -> dict[str, list[dict]]:
    """``examples.json``: per tab, the example images, where each comes from and, for the
    Ask tab, questions to try."""
    try:
        listed = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        log.warning("no usable example list at %s", MANIFEST, exc_info=True)
        return {}
    return {tab: [e for e in items if (EXAMPLES / e["file"]).is_file()] for tab, items in listed.items()}


def read_upload(upload) -> tuple[bytes, object]:
    """(bytes, RGB image), or show the reason in the page and return (bytes, None)."""
    data = upload.getvalue()
    try:
        return data, load_image(data, MAX_PIXELS)
    except ImageError as e:
        st.error(f"{upload.name}: {e.reason}. Please upload a PNG, JPEG or WebP image.")
        return data, None


def pick_image(key: str) -> tuple[str, object, dict | None] | None:
    """An example or an uploaded image: (identity, image, the example or None), or None."""
    listed = examples().get(key, [])
    source = st.radio("Image", ["Example", "Upload"] if listed else ["Upload"], horizontal=True, key=f"{key}-source")
    if source == "Example":
        titles = [e["title"] for e in listed]
        title = st.selectbox("Example", titles, key=f"{key}-ex")
        example = listed[titles.index(title)]
        return f"example:{example['file']}", load_image(EXAMPLES / example["file"]), example
    upload = st.file_uploader("Upload an image", key=f"{key}-upload")
    if upload is None:
        return None
    data, image = read_upload(upload)
    if image is None:
        return None
    return "upload:" + hashlib.sha256(data).hexdigest(), image, None


def show_image(image, side: int) -> None:
    """Show the image within a side × side box; the model still gets the original.

    st.image scales what it gets down to the display width and re-encodes it: a side past
    65,535 px cannot be encoded and a very flat image rounds to 0 px high, so it gets a
    copy that already fits. Small images (easy-VQA's are 64 px) are shown enlarged."""
    scale = min(side / image.width, side / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if scale < 1:
        image = image.resize(size, reducing_gap=3.0)
    elif scale > 1:
        image = image.resize(size, resample=0)  # nearest: the pixels the model sees, only larger
    st.image(image, width=max(1, round(side * min(1.0, image.width / image.height))))


# ---------------------------------------------------------------------- decoding


def decoding(task: Task, key: str, model: VLM, most: int) -> GenerationConfig:
    """The visitor's decoding settings for a tab, starting from its task's defaults for this
    checkpoint (the command-line tools start from the same)."""
    base = task.generation_config(model)
    length, beams, temperature, top_p = (
        int(base.max_new_tokens),
        int(base.num_beams),
        float(base.temperature),
        float(base.top_p),
    )
    with st.expander("Decoding", expanded=False):
        max_new = st.slider("Max new tokens", 1, max(most, length), length, key=f"{key}-max-new")
        beams = st.slider("Beams", 1, max(4, beams), beams, key=f"{key}-beams")
        sample = st.checkbox("Sample", value=bool(base.do_sample), disabled=beams > 1, key=f"{key}-sample")
        temperature = st.slider(
            "Temperature", 0.1, max(1.5, temperature), temperature, disabled=not sample, key=f"{key}-temp"
        )
        top_p = st.slider("Top-p", min(0.05, top_p), 1.0, top_p, disabled=not sample, key=f"{key}-top-p")
    return task.generation_config(
        model,
        max_new_tokens=max_new,
        num_beams=beams,
        do_sample=sample and beams == 1,
        temperature=temperature,
        top_p=top_p,
    )


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


def generate_streamed(chat: Chat, question: str, cfg: GenerationConfig, show) -> tuple[str, Timing]:
    """Ask ``chat`` the next question, streaming the text so far to ``show`` (beam search
    answers whole); the answer and its timing.

    The token count is exact when streaming: the engine counts a request's tokens, and
    without it the session holds the prompt and every answer token but the last one when
    the answer ran to its length limit."""
    if cfg.num_beams > 1:

        def whole():  # timed from the request: the answer arrives in one piece
            yield chat.ask(question, cfg)

        text, first, total = timed_stream(whole(), show)
        tokens = len(chat.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return text.strip(), Timing(total, total, tokens)  # beams give the whole answer at once
    prompt = prompt_tokens(chat, chat.turns, question)
    text, first, total = timed_stream(chat.ask_stream(question, cfg), show)
    if chat.on_engine(cfg):
        return text.strip(), Timing(first, total, chat.answer_tokens)
    fed = chat.session.ids[0, prompt:].tolist()
    unfed = len(text) > len(chat.processor.tokenizer.decode(fed, skip_special_tokens=True))
    return text.strip(), Timing(first, total, len(fed) + unfed)


def thinking(placeholder) -> None:
    placeholder.markdown("_Thinking…_")


def plain(text: str) -> str:
    """Model text shown as is in Markdown: no links, images or formatting it did not mean."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


# ---------------------------------------------------------------------- feedback


def feedback_widgets(entry: dict, what: str) -> None:
    """👍 / 👎 and a correction for one output; each change appends a record."""
    folder = feedback_folder()
    if folder is None:
        return
    key = entry["id"]
    st.feedback("thumbs", key=f"rate-{key}", on_change=_rated, args=(entry,))
    with st.expander(f"Correct this {what}"):
        with st.form(f"fix-form-{key}", border=False):
            st.text_area(
                f"The right {what}",
                value=entry.get("correction") or entry.get("shown", entry["answer"]),
                key=f"fix-{key}",
                height=68 if entry["task"] == "vqa" else 240,
            )
            st.form_submit_button("Save correction", on_click=_corrected, args=(entry,))
    if entry.get("feedback_error"):
        st.error(entry["feedback_error"])
    elif entry.get("saved"):
        parts = [{"up": "👍", "down": "👎"}.get(entry.get("rating"), "no rating")]
        parts += ["corrected"] if entry.get("correction") else []
        st.caption(f"Feedback saved ({', '.join(parts)}) in {folder}/. Thank you.")


def _rated(entry: dict) -> None:
    entry["rating"] = RATING.get(st.session_state.get(f"rate-{entry['id']}"))
    _save(entry)


def _corrected(entry: dict) -> None:
    text = (st.session_state.get(f"fix-{entry['id']}") or "").strip()
    entry["correction"] = text or None
    _save(entry)


def _save(entry: dict) -> None:
    folder = feedback_folder()
    if folder is None:
        return
    feedback = FeedbackLog(folder)
    try:
        record = Record(
            task=entry["task"],
            answer_id=entry["id"],
            image=feedback.add_image(entry["image"]),
            answer=entry["answer"],
            question=entry.get("question", ""),
            turns=[list(t) for t in entry.get("turns", [])],
            rating=entry.get("rating"),
            correction=entry.get("correction"),
            model=entry["model"],
            decoding=entry["decoding"],
        )
        feedback.append(record)
        entry["saved"], entry["feedback_error"] = True, None
    except (OSError, ValueError) as e:  # a full disk or a read-only folder must not break the page
        log.warning("could not save feedback to %s", folder, exc_info=True)
        entry["feedback_error"] = f"Could not save the feedback ({short_reason(e)})."


def new_entry(task: str, image, model_name: str, cfg: GenerationConfig, **fields) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "task": task,
        "image": image,
        "model": {"name": model_name, "path": str(model_path(model_name))},
        "decoding": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "rating": None,
        "correction": None,
        **fields,
    }


# ---------------------------------------------------------------------- the tabs


def ask_tab(model, processor, model_name: str) -> None:
    cfg = decoding(VQA, "ask", model, 512)
    picked = pick_image("ask")
    if picked is None:
        st.info("Pick an example or upload an image to start a conversation.")
        return
    identity, image, example = picked
    # One Chat per image, model and browser session: the image is encoded once per conversation.
    engine = get_engine(id(model), model, processor.tokenizer)
    if st.session_state.get("chat_id") != identity or st.session_state.chat.model is not model:
        st.session_state.chat_id = identity
        st.session_state.chat = Chat(model, processor, [image], engine=engine)
        st.session_state.ask_log = []
    chat: Chat = st.session_state.chat
    left, right = st.columns([1, 2])
    with left:
        show_image(image, 256)
        if example:
            st.caption(example["source"])
    suggested = None
    with right:
        if example and example.get("questions"):
            st.caption("Questions to try (the bundled model answers these right):")
            for i, q in enumerate(example["questions"]):
                if st.button(q, key=f"ask-suggest-{i}"):
                    suggested = q
        if st.button("New conversation"):
            st.session_state.chat = chat = Chat(model, processor, [image], engine=engine)
            st.session_state.ask_log = []
        remember = st.checkbox(
            "Follow-up questions see the earlier turns",
            value=False,
            key="ask-remember",
            help="Off: each question is asked on its own (the image is still encoded once). The bundled "
            "model was trained on single questions, and earlier turns can confuse it.",
        )
    history = st.container()  # above the input box, where new turns appear too
    with history:
        for entry in st.session_state.ask_log:
            show_turn(entry)
    question = st.chat_input("Ask about the image")
    question = suggested if question is None else question
    if question is None:
        return
    if not question.strip():
        st.warning("The question is empty: type something to ask.")
        return
    if not remember:
        chat.turns.clear()  # the session keeps the image and the prompt's shared start
    dropped = fit_to_context(chat, question, cfg.max_new_tokens)
    if dropped is None:
        st.error(
            f"The question is too long: with an answer of up to {cfg.max_new_tokens} tokens it does not fit "
            "the model's context. Ask a shorter question or lower Max new tokens."
        )
        return
    earlier = [list(t) for t in chat.turns]
    with history:
        if dropped:
            st.info(f"The oldest {dropped} turn(s) were left out to fit the model's context; the image stays.")
        st.chat_message("user").markdown(plain(question))
        with st.chat_message("assistant"):
            placeholder = st.empty()
            thinking(placeholder)
            answer, timing = generate_streamed(chat, question, cfg, lambda t: placeholder.markdown(plain(t) + " ▌"))
            placeholder.markdown(plain(answer))
            entry = new_entry("vqa", image, model_name, cfg, question=question, answer=answer, turns=earlier)
            entry["timing"] = timing.to_dict()
            st.session_state.ask_log.append(entry)
            st.caption(timing.line())
            feedback_widgets(entry, "answer")


def show_turn(entry: dict) -> None:
    st.chat_message("user").markdown(plain(entry["question"]))
    with st.chat_message("assistant"):
        st.markdown(plain(entry["answer"]))
        st.caption(Timing(**{k: v for k, v in entry["timing"].items() if k != "tokens_per_s"}).line())
        feedback_widgets(entry, "answer")


def caption_tab(model, processor, model_name: str) -> None:
    cfg = decoding(CAPTION, "caption", model, 256)
    uploads = st.file_uploader("Images to caption", accept_multiple_files=True, key="caption-upload")
    if not uploads:
        st.info("Upload one or more images.")
        return
    batch = (model_name, tuple(hashlib.sha256(u.getvalue()).hexdigest() for u in uploads))
    if st.button("Caption them"):
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
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["file", "caption", "error"])
        writer.writeheader()
        writer.writerows(rows)
        st.session_state.captions = {"batch": batch, "rows": rows, "csv": buf.getvalue()}
    result = st.session_state.get("captions")
    if result is None or result["batch"] != batch:
        return
    st.dataframe(result["rows"])
    # on_click="ignore": the download happens in the browser without rerunning the app.
    st.download_button("Download CSV", result["csv"], file_name="captions.csv", mime="text/csv", on_click="ignore")


def sketch_tab(model, processor, model_name: str) -> None:
    cfg = decoding(SKETCH, "sketch", model, 1024)
    picked = pick_image("sketch")
    if picked is None:
        st.info("Pick the example sketch or upload a drawing of a page layout.")
        return
    identity, image, example = picked
    show_image(image, 320)
    if example:
        st.caption(example["source"])
        if example.get("reference"):
            with st.expander("The page this sketch was drawn from"):
                st.code(format_body(example["reference"]), language="html")
    key = (identity, model_name)
    if st.button("Generate HTML"):
        st.session_state.sketch = None
        placeholder = st.empty()
        thinking(placeholder)
        # The sketch prompt as the one question of a conversation: the same segments as
        # SKETCH.prompt (tests/test_demo.py checks), streamed with the chat's session.
        chat = Chat(model, processor, [image])
        raw, timing = generate_streamed(chat, SKETCH_PROMPT, cfg, lambda t: placeholder.code(t + " ▌", language="html"))
        placeholder.empty()
        body, problems = repair_html(raw)
        entry = new_entry("sketch", image, model_name, cfg, answer=body, shown=format_body(body))
        entry.update(key=key, raw=raw, page=document(body), problems=problems, timing=timing.to_dict())
        st.session_state.sketch = entry
    entry = st.session_state.get("sketch")
    if entry is None or entry["key"] != key:
        return
    show_page(entry)


def show_page(entry: dict) -> None:
    if entry["problems"]:
        st.warning("The generated HTML was repaired: " + "; ".join(entry["problems"]))
    st.caption(Timing(**{k: v for k, v in entry["timing"].items() if k != "tokens_per_s"}).line())
    left, right = st.columns(2)
    with left:
        st.markdown("**Body HTML** (the model's output, laid out; the page adds a fixed stylesheet)")
        st.code(entry["shown"] or "(empty)", language="html")
    with right:
        st.markdown("**Preview** (sandboxed: no scripts, no network)")
        # A sandboxed iframe with no permissions: no scripts, no same-origin access; the
        # page's own Content-Security-Policy also forbids scripts and network requests.
        st.iframe(
            f'<iframe sandbox="" srcdoc="{html.escape(entry["page"], quote=True)}" '
            'style="width:100%;height:560px;border:1px solid #ccc"></iframe>',
            height=580,
        )
    st.download_button(
        "Download HTML", entry["page"], file_name="page.html", mime="text/html", on_click="ignore"
    )  # the whole document
    with st.expander("The whole document"):
        st.code(entry["page"], language="html")
    feedback_widgets(entry, "page")


def main() -> None:
    st.set_page_config(page_title="vlm demo", layout="wide")
    st.title("vlm demo")
    model, processor, name = pick_model()
    model_panel(name)
    folder = feedback_folder()
    st.sidebar.caption(
        f"Rate answers with 👍 / 👎 and correct them: each rating is saved with its image in {folder}/ "
        "to improve the model."
        if folder
        else "Feedback is off."
    )
    tabs = st.tabs(["Ask", "Caption", "Sketch → HTML"])
    for tab, show in zip(tabs, (ask_tab, caption_tab, sketch_tab)):
        with tab:
            try:
                show(*(for_task("sketch", model, processor, name) if show is sketch_tab else (model, processor, name)))
            except (ImageError, ValueError) as e:
                st.error(f"That did not work: {e}")


main()
