"""The tasks: per task, its prompt, how a training sample becomes segments, and its
decoding defaults. The data pipeline, ``vlm eval``, the apps and the demo all ask here.

======================  ==============  =========================================================
task                    shard format    prompt (chat template / none)
======================  ==============  =========================================================
``CAPTION``             ``caption``     :data:`CAPTION_PROMPT` as the user turn / ``<image>`` alone
``VQA``                 ``qa``          the question as the user turn / ``Question: … Answer:``
``SKETCH``              ``sketch``      :data:`SKETCH_PROMPT` as the user turn (both)
``INTERLEAVED``         ``interleaved`` the document itself
======================  ==============  =========================================================

A task's inference prompt is exactly the untrained start of its training sample, token
for token (``tests/test_tasks.py``): the model is asked the way it was taught. The text
formats themselves (chat template, ``<image>``, ``<|endofchunk|>``) are the
:class:`~vlm.processor.Processor`'s. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from .generate import GenerationConfig
    from .model import VLM
    from .processor import Processor, Segment

__all__ = [
    "CAPTION",
    "CAPTION_PROMPT",
    "INTERLEAVED",
    "KINDS",
    "SKETCH",
    "SKETCH_PROMPT",
    "TASKS",
    "VQA",
    "Decoding",
    "Example",
    "Task",
    "caption_images",
    "for_kind",
    "sketch_to_html",
]

CAPTION_PROMPT = "Describe the image in one sentence."
"""The caption instruction for LMs with a chat template. LMs without one are trained on
Flamingo's plain ``<image>caption<|endofchunk|>`` and get no instruction."""
SKETCH_PROMPT = "Write the HTML for this sketch."


@dataclass(frozen=True)
class Decoding:
    """A task's decoding defaults: the apps, ``vlm eval`` and the demo start from these
    and change only what their user sets."""

    max_new_tokens: int
    repetition_penalty: float = 1.0
    prompt_lookup: int = 0
    """Prompt-lookup drafts (:attr:`vlm.generate.GenerationConfig.prompt_lookup`): used by
    greedy decoding of a batch of one, where they give greedy's tokens in fewer passes;
    dropped for sampling, beams or a repetition penalty."""


@dataclass
class Example:
    """One decoded sample of a task: its images, and its text as the task needs it
    (``text``: caption or page; ``turns``: question/answer pairs; ``items``: an
    interleaved document's ``{"text": …}`` / ``{"image": name}`` list)."""

    kind: str  # the shard format: caption | qa | interleaved | sketch
    images: list[Image.Image]
    text: str = ""
    turns: list[tuple[str, str]] | None = None
    items: list[dict] | None = None


@dataclass(frozen=True)
class Task:
    """What the library knows about one task. Subclasses give the text formats."""

    name: str
    kind: str
    """The shard format its training samples come in (``training/data/shards.py``)."""
    decoding: Decoding

    def segments(self, processor: Processor, example: Example) -> list[Segment]:
        """The training text of ``example``: an untrained prompt, then the trained target."""
        raise NotImplementedError

    def prompt(self, processor: Processor, query: Any = None) -> list[Segment]:
        """The inference prompt for one image (``query``: the question, a caption
        instruction of the user's own, or nothing): what :meth:`segments` gives as its
        untrained start, for the model to continue with the target."""
        raise NotImplementedError

    def few_shot(
        self, processor: Processor, examples: Sequence[tuple[str | None, str]], query: str | None = None
    ) -> list[Segment]:
        """k solved ``(query, answer)`` examples, one image each, then :meth:`prompt`'s
        query with its image: k + 1 images in all, in that order."""
        raise NotImplementedError

    def generation_config(self, model: VLM | None = None, **overrides: Any) -> GenerationConfig:
        """A :class:`~vlm.generate.GenerationConfig` for this task: the defaults of
        ``model``'s checkpoint (its ``generation_config.json``) when it has them, else this
        task's own; ``overrides`` set any field (``None`` keeps the default)."""
        from .generate import GenerationConfig

        given = {k: v for k, v in overrides.items() if v is not None}
        saved = getattr(model, "generation_defaults", None) or {}
        shared = {k: v for k, v in saved.items() if k != "tasks"}
        own = saved.get("tasks", {}).get(self.name, dataclasses.asdict(self.decoding))
        config = GenerationConfig().replace(**{**shared, **own, **given})
        greedy = not config.do_sample and config.num_beams == 1 and config.repetition_penalty == 1.0
        if "prompt_lookup" not in given and not greedy:
            config.prompt_lookup = 0  # drafts are exact for plain greedy decoding only
        return config


class Caption(Task):
    """Describe an image. A chat LM gets :data:`CAPTION_PROMPT` (or the user's own
    instruction) as a user turn and answers with the caption; an LM without a chat
    template continues ``<image>`` (Flamingo's form, which it was trained on)."""

    def segments(self, processor: Processor, example: Example) -> list[Segment]:
        if processor.uses_chat_template:
            return processor.chat_segments([(CAPTION_PROMPT, example.text)])
        return processor.caption_segments(example.text)

    def prompt(self, processor: Processor, query: str | None = None) -> list[Segment]:
        if processor.uses_chat_template:
            return processor.chat_segments([(query or CAPTION_PROMPT, None)])
        return processor.caption_prompt(query or "")

    def few_shot(
        self, processor: Processor, examples: Sequence[tuple[str | None, str]], query: str | None = None
    ) -> list[Segment]:
        if processor.uses_chat_template:
            shots = [(q or CAPTION_PROMPT, a) for q, a in examples]
            return processor.few_shot_segments(shots, query or CAPTION_PROMPT)
        return processor.few_shot_segments([(q or "", a) for q, a in examples], query or "", style="caption")


class QuestionAnswering(Task):
    """Questions about images, one or more turns; the first question comes after the image."""

    def segments(self, processor: Processor, example: Example) -> list[Segment]:
        return processor.chat_segments(example.turns)

    def prompt(self, processor: Processor, query: str | None = None) -> list[Segment]:
        if not query:
            raise ValueError("question answering needs a question")
        return processor.chat_segments([(query, None)])

    def conversation(
        self, processor: Processor, turns: Sequence[tuple[str, str]], question: str, num_images: int = 1
    ) -> list[Segment]:
        """The next turn of a conversation about ``num_images`` images (shown before its
        first question): the earlier ``turns``, then ``question`` for the model to answer."""
        return processor.chat_segments([*turns, (question, None)], num_images=num_images)

    def few_shot(
        self, processor: Processor, examples: Sequence[tuple[str | None, str]], query: str | None = None
    ) -> list[Segment]:
        if not query or not all(q for q, _ in examples):
            raise ValueError("question answering needs a question for every example and the query")
        return processor.few_shot_segments(list(examples), query)


class SketchToHTML(Task):
    """A drawn page layout in, the page's body HTML out, asked with :data:`SKETCH_PROMPT`
    in the LM's chat format (``Question: … Answer:`` without a chat template)."""

    def segments(self, processor: Processor, example: Example) -> list[Segment]:
        return processor.chat_segments([(SKETCH_PROMPT, example.text)])

    def prompt(self, processor: Processor, query: None = None) -> list[Segment]:
        return processor.chat_segments([(SKETCH_PROMPT, None)])

    def few_shot(
        self, processor: Processor, examples: Sequence[tuple[str | None, str]], query: None = None
    ) -> list[Segment]:
        return processor.few_shot_segments([(SKETCH_PROMPT, a) for _, a in examples], SKETCH_PROMPT)


class Interleaved(Task):
    """Documents of text and images, all text trained (Flamingo's pretraining form)."""

    def segments(self, processor: Processor, example: Example) -> list[Segment]:
        # The items, not a joined string: text items stay text whatever they contain.
        return processor.interleaved_segments(example.items)

    def prompt(self, processor: Processor, query: Sequence[dict] | None = None) -> list[Segment]:
        """``query``: the start of a document (items); the model continues its last chunk."""
        if not query:
            raise ValueError("an interleaved prompt needs the start of a document")
        (segment,) = processor.interleaved_segments(query)
        text = segment.text.removesuffix(processor.end_of_chunk_token)
        return [dataclasses.replace(segment, text=text, trained=False)]

    def few_shot(self, processor, examples, query=None):
        raise ValueError("interleaved documents carry their own examples: put them in the document")


CAPTION = Caption("caption", "caption", Decoding(max_new_tokens=32))
VQA = QuestionAnswering("vqa", "qa", Decoding(max_new_tokens=32))
# Pages repeat their own markup: with one sketch, prompt-lookup drafts give greedy's page
# in fewer passes (1.25x tokens/s on 10 test sketches, benchmarks/generate.py --sketch-lookup).
SKETCH = SketchToHTML("sketch", "sketch", Decoding(max_new_tokens=400, prompt_lookup=4))
INTERLEAVED = Interleaved("interleaved", "interleaved", Decoding(max_new_tokens=32))

TASKS: dict[str, Task] = {task.name: task for task in (CAPTION, VQA, SKETCH, INTERLEAVED)}
_BY_KIND = {task.kind: task for task in TASKS.values()}
KINDS = tuple(_BY_KIND)
"""The shard sample formats, one per task: caption, qa, sketch, interleaved."""


def for_kind(kind: str) -> Task:
    """The task whose training samples come in shard format ``kind``."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown sample format {kind!r}; formats: {', '.join(_BY_KIND)}") from None


# ---------------------------------------------------------------------- generation_config.json

GENERATION_CONFIG_FILE = "generation_config.json"
"""A checkpoint's decoding defaults: top-level :class:`~vlm.generate.GenerationConfig`
fields for ``model.generate`` and every task, and under ``"tasks"`` each task's own
(``{"tasks": {"sketch": {"max_new_tokens": 400, "prompt_lookup": 4}, ...}}``)."""


def default_generation_config() -> dict[str, Any]:
    """What a checkpoint without ``generation_config.json`` decodes with: each task's
    :class:`Decoding`."""
    return {"tasks": {name: dataclasses.asdict(task.decoding) for name, task in TASKS.items()}}


def check_generation_config(data: Any, source: str) -> dict[str, Any]:
    """``data`` as read from ``source``, checked: known fields with valid values only."""
    from .generate import GenerationConfig

    if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
        raise ValueError(f"{source}: expected an object of generation options with an optional 'tasks' object")
    sections = {"top level": {k: v for k, v in data.items() if k != "tasks"}}
    unknown_tasks = sorted(set(data.get("tasks", {})) - set(TASKS))
    if unknown_tasks:
        raise ValueError(f"{source}: unknown task {', '.join(unknown_tasks)}; tasks: {', '.join(TASKS)}")
    sections.update({f"tasks.{k}": v for k, v in data.get("tasks", {}).items()})
    for where, options in sections.items():
        if not isinstance(options, dict):
            raise ValueError(f"{source}: {where} must be an object of generation options")
        try:
            GenerationConfig().replace(**sections["top level"]).replace(**options).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {where}: {e}") from None
    for options in sections.values():  # JSON lists where the config holds tuples
        for key in ("stop_token_ids", "stop_strings"):
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
    return {**sections["top level"], "tasks": {k[len("tasks.") :]: v for k, v in sections.items() if k != "top level"}}


# ---------------------------------------------------------------------- running them


def generate_texts(
    model: VLM,
    processor: Processor,
    segments: Sequence[Segment],
    images: Sequence[Image.Image],
    config: GenerationConfig,
) -> list[str]:
    """One generation per image, each asked with the same ``segments``, in one batch."""
    import torch

    from .generate import generate

    batch = processor([segments] * len(images), [[image] for image in images], padding_side="left")
    device = next(model.parameters()).device
    tensors = [batch[name].to(device) for name in ("pixel_values", "input_ids", "attention_mask")]
    with torch.inference_mode():
        result = generate(model, *tensors, config=config, tokenizer=processor.tokenizer)
    return list(result.texts or [])


def caption_images(
    model: VLM,
    processor: Processor,
    images: Sequence[Image.Image],
    prompt: str | None = None,
    config: GenerationConfig | None = None,
) -> list[str]:
    """One stripped caption per image. ``prompt=None``: :data:`CAPTION_PROMPT` for a chat
    LM, none otherwise; ``config=None``: the checkpoint's caption decoding defaults."""
    if not images:
        return []
    config = config or CAPTION.generation_config(model)
    return [
        text.strip() for text in generate_texts(model, processor, CAPTION.prompt(processor, prompt), images, config)
    ]


def sketch_to_html(
    model: VLM,
    processor: Processor,
    images: Sequence[Image.Image],
    max_new_tokens: int | None = None,
    num_beams: int = 1,
) -> list[tuple[str, list[str]]]:
    """A complete HTML document and the list of repairs it needed, per sketch: the model's
    body HTML made well-formed and safe (:func:`vlm.html.repair_html`) inside the page
    shell (:func:`vlm.html.document`). ``max_new_tokens=None``: the checkpoint's default."""
    from .html import document, repair_html

    if not images:
        return []
    config = SKETCH.generation_config(model, max_new_tokens=max_new_tokens, num_beams=num_beams)
    pages = []
    for text in generate_texts(model, processor, SKETCH.prompt(processor), images, config):
        body, problems = repair_html(text)
        pages.append((document(body), problems))
    return pages
