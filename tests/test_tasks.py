"""vlm/tasks.py: the model is asked the way it was taught. For each task, the prompt that
the data pipeline trains (the untrained start of a sample) is, token for token, what
``vlm eval``, the apps and the demo send; the decoding defaults come from one place."""

import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import shape_image

import vlm.generate
from vlm import factory
from vlm.apps import DTYPES, caption, sketch2html
from vlm.chat import Chat
from vlm.model import IGNORE_INDEX
from vlm.tasks import (
    CAPTION,
    CAPTION_PROMPT,
    INTERLEAVED,
    SKETCH,
    SKETCH_PROMPT,
    TASKS,
    VQA,
    Example,
    caption_images,
    for_kind,
    sketch_to_html,
)
from vlm_train.data.decode import decode_sample, example_segments
from vlm_train.data.shards import ShardWriter, caption_sample, image_bytes, interleaved_sample, qa_sample, sketch_sample
from vlm_train.eval import cli as eval_cli

REPO = Path(__file__).resolve().parents[1]
PAGE = "<header><h1>Acme</h1></header><main><p>Hello</p></main>"
QUESTION, ANSWER = "what colour is the shape?", "red"
# llama: the tiny LM with a ChatML template; qwen2: one without a chat template.
LMS = {"chat": ("llama", None), "chat+system": ("llama", "Be brief."), "plain": ("qwen2", None)}


@pytest.fixture(params=sorted(LMS))
def model(request, make_model):
    family, system = LMS[request.param]
    model, processor = make_model(family)
    processor.system_prompt = system
    assert processor.uses_chat_template == (family == "llama")
    return model, processor


def raw_sample(kind: str) -> dict:
    png = image_bytes(shape_image("red"))
    return {
        "caption": lambda: caption_sample("k", png, "a red circle"),
        "qa": lambda: qa_sample("k", png, [(QUESTION, ANSWER)]),
        "sketch": lambda: sketch_sample("k", png, PAGE),
        "interleaved": lambda: interleaved_sample("k", ["a red shape", png, "it is round"]),
    }[kind]()


def trained_prompt(processor, kind: str) -> list[int]:
    """The ids before the first trained token of a training sample of ``kind``."""
    ids, labels = processor.encode(example_segments(processor, decode_sample(raw_sample(kind), kind)))
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first]


@pytest.fixture
def sent(monkeypatch):
    """The ``input_ids`` rows and configs that reach ``vlm.generate.generate``, which answers ''."""
    calls = []

    def fake_generate(model, images, input_ids, attention_mask=None, config=None, tokenizer=None, **kwargs):
        calls.append(SimpleNamespace(ids=input_ids, mask=attention_mask, config=config))
        return SimpleNamespace(texts=[""] * input_ids.shape[0], tokens=[[]] * input_ids.shape[0])

    monkeypatch.setattr(vlm.generate, "generate", fake_generate)
    return calls


def row(call, i: int = 0) -> list[int]:
    """Row ``i`` of a left-padded batch, without its padding."""
    return call.ids[i][call.mask[i].bool()].tolist() if call.mask is not None else call.ids[i].tolist()


def eval_prompt_ids(model, processor, kind: str, tmp_path: Path, sent) -> list[int]:
    with ShardWriter(tmp_path / kind, kind) as writer:
        writer.write(raw_sample(kind))
    task = for_kind(kind)
    items = eval_cli.load_items(str(tmp_path / kind), task, None)
    eval_cli.predict(model, processor, task, items, items, 0, 0, 8)
    assert sent[-1].config == task.generation_config()  # eval decodes with the task's defaults
    return row(sent[-1])


# ---------------------------------------------------------------------- prompts


def test_caption_prompt_is_the_trained_one_in_eval_the_app_and_the_demo(model, tmp_path, sent):
    model, processor = model
    trained = trained_prompt(processor, "caption")
    assert eval_prompt_ids(model, processor, "caption", tmp_path, sent) == trained
    caption_images(model, processor, [shape_image("blue")])  # the CLI and the demo call this
    assert row(sent[-1]) == trained
    if processor.uses_chat_template:
        assert CAPTION_PROMPT in processor.tokenizer.decode(trained)
    else:
        assert trained == [processor.image_token_id]  # Flamingo's <image>caption form, no instruction


def test_question_prompt_is_the_trained_one_in_eval_and_the_chat(model, tmp_path, sent, monkeypatch):
    model, processor = model
    trained = trained_prompt(processor, "qa")
    assert eval_prompt_ids(model, processor, "qa", tmp_path, sent) == trained
    monkeypatch.setattr("vlm.chat.generate", vlm.generate.generate)  # the demo's Ask tab
    Chat(model, processor, [shape_image("blue")]).ask(QUESTION)
    assert row(sent[-1]) == trained
    demo_ids = processor.encode(VQA.conversation(processor, [], QUESTION, num_images=1))[0]
    assert demo_ids == trained  # what the demo measures against the context


def test_sketch_prompt_is_the_trained_one_in_eval_the_app_and_the_demo(model, tmp_path, sent):
    model, processor = model
    trained = trained_prompt(processor, "sketch")
    assert SKETCH_PROMPT in processor.tokenizer.decode(trained)
    assert eval_prompt_ids(model, processor, "sketch", tmp_path, sent) == trained
    sketch_to_html(model, processor, [shape_image("blue")])
    assert row(sent[-1]) == trained


def test_interleaved_prompt_is_the_document_without_its_last_end_of_chunk(model):
    _, processor = model
    ids, labels = processor.encode(example_segments(processor, decode_sample(raw_sample("interleaved"), "interleaved")))
    assert all(label != IGNORE_INDEX or i == processor.image_token_id for i, label in zip(ids, labels))
    items = [{"text": "a red shape"}, {"image": "0.png"}, {"text": "it is round"}]
    prompt, prompt_labels = processor.encode(INTERLEAVED.prompt(processor, items))
    assert ids[-1] == processor.end_of_chunk_token_id and prompt == ids[:-1]
    assert set(prompt_labels) == {IGNORE_INDEX}


def test_few_shot_prompts_follow_the_trained_form(model):
    _, processor = model
    chat = processor.uses_chat_template
    shots = CAPTION.few_shot(processor, [(None, "a red circle")], None)
    expected = (
        processor.few_shot_segments([(CAPTION_PROMPT, "a red circle")], CAPTION_PROMPT)
        if chat
        else processor.few_shot_segments([("", "a red circle")], "", style="caption")  # <image>a red circle<eoc><image>
    )
    assert processor.encode(shots) == processor.encode(expected)
    few = processor.encode(VQA.few_shot(processor, [(QUESTION, ANSWER)], QUESTION))[0]
    assert few.count(processor.image_token_id) == 2
    assert processor.encode(SKETCH.few_shot(processor, [(None, PAGE)]))[0].count(processor.image_token_id) == 2


def test_every_shard_format_has_its_task():
    assert {task.kind for task in TASKS.values()} == {"caption", "qa", "sketch", "interleaved"}
    for task in TASKS.values():
        assert for_kind(task.kind) is task
    with pytest.raises(ValueError, match="unknown sample format"):
        for_kind("video")
    assert Example("caption", []).text == ""


# ---------------------------------------------------------------------- decoding defaults


def _defaults(parser: argparse.ArgumentParser) -> dict:
    return {action.dest: action.default for action in parser._actions}


def test_decoding_defaults_come_from_the_tasks(model, sent):
    model, processor = model
    # The commands leave it to the checkpoint (its generation_config.json, else the task's).
    assert _defaults(caption.build_parser())["max_new_tokens"] is None
    assert _defaults(sketch2html.build_parser())["max_new_tokens"] is None
    caption_images(model, processor, [shape_image("red")])
    assert sent[-1].config == CAPTION.generation_config()
    sketch_to_html(model, processor, [shape_image("red")])
    assert sent[-1].config.max_new_tokens == SKETCH.decoding.max_new_tokens == 400
    assert sent[-1].config.prompt_lookup == SKETCH.decoding.prompt_lookup == 4  # used by a batch of one
    sketch_to_html(model, processor, [shape_image("red")], max_new_tokens=9, num_beams=2)
    assert (sent[-1].config.max_new_tokens, sent[-1].config.num_beams, sent[-1].config.prompt_lookup) == (9, 2, 0)
    for task in TASKS.values():
        config = task.generation_config()
        assert config.repetition_penalty == task.decoding.repetition_penalty == 1.0
        config.validate()
        # Drafts are exact for plain greedy only: sampling, beams or a penalty drop them.
        assert task.generation_config(do_sample=True).validate().prompt_lookup == 0
        assert task.generation_config(repetition_penalty=1.1).validate().prompt_lookup == 0
        assert task.generation_config(max_new_tokens=None).max_new_tokens == task.decoding.max_new_tokens


def test_the_checkpoints_decoding_defaults_reach_the_tasks(model, sent, monkeypatch):
    model, processor = model
    monkeypatch.setattr(model, "generation_defaults", {"tasks": {"caption": {"max_new_tokens": 5}, "sketch": {}}})
    caption_images(model, processor, [shape_image("red")])
    assert sent[-1].config.max_new_tokens == 5
    sketch_to_html(model, processor, [shape_image("red")])  # an empty entry: GenerationConfig's own defaults
    assert (sent[-1].config.max_new_tokens, sent[-1].config.prompt_lookup) == (32, 0)
    sketch_to_html(model, processor, [shape_image("red")], max_new_tokens=7)
    assert sent[-1].config.max_new_tokens == 7


# ---------------------------------------------------------------------- the commands


PARSERS = {"caption": caption.build_parser, "sketch2html": sketch2html.build_parser, "eval": eval_cli.build_parser}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_commands_share_model_device_dtype_and_use_underscores(name):
    parser = PARSERS[name]()
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    assert {"--model", "--device", "--dtype"} <= set(flags)
    assert [flag for flag in flags if "-" in flag[2:]] == []
    defaults = _defaults(parser)
    assert (defaults["model"], defaults["device"], defaults["dtype"]) == (None, "auto", "auto")
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert parser.parse_known_args(["x.png", "--device", device])[0].device == device
    with pytest.raises(SystemExit):
        parser.parse_known_args(["x.png", "--device", "tpu"])
    assert DTYPES == factory.DTYPES


def test_parsers_import_without_torch():
    probe = "import sys, vlm; print('torch' in sys.modules)"
    if (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO).stdout.strip()
        != "False"
    ):
        pytest.skip("`import vlm` itself imports torch (vlm/__init__.py is not lazy)")
    code = (
        "import sys\n"
        "from vlm.apps import caption, sketch2html\n"
        "from vlm_train.eval import cli\n"
        "for m in (caption, sketch2html, cli): m.build_parser().format_help()\n"
        "print(sorted(n for n in ('torch', 'transformers', 'numpy') if n in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_load_model_places_and_casts(tmp_path):
    from conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path, gates=0.5)
    model, processor = factory.load_model(ckpt, verbose=False, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert factory.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="dtype must be one of"):
        factory.resolve_dtype("int8")
    captions = caption_images(
        model, processor, [shape_image("red")], config=CAPTION.generation_config(max_new_tokens=3)
    )
    assert len(captions) == 1
