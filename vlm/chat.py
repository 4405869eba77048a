"""A multi-turn conversation about one set of images, for the demo and scripts.

The image is encoded once per conversation and each new turn runs only its new
tokens: the conversation is re-rendered in the LM's chat format every turn, and the
generation session reuses the longest prefix it has already computed.

With an :class:`vlm.engine.Engine`, turns run on the engine's thread, batched with
whatever else it serves (other conversations, other users of a demo); the engine keeps
a copy of each turn's prompt for the next one to start from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from .engine import Engine, release_openmp_threads
from .generate import GenerationConfig, Session, _resolve, generate, stream
from .model import VLM
from .processor import Processor
from .tasks import VQA


class Chat:
    """Holds one conversation's state; the model stays shared and untouched.

    ``engine``: run greedy and sampled turns on it (beam search and prompt lookup, which it
    does not do, still run on the calling thread)."""

    def __init__(
        self, model: VLM, processor: Processor, images: Sequence[Image.Image] = (), engine: Engine | None = None
    ):
        if engine is not None and engine.model is not model:
            raise ValueError("the engine runs another model than the chat's")
        self.model = model
        self.processor = processor
        self.images = list(images)
        self.engine = engine
        self.turns: list[tuple[str, str]] = []
        self.session: Session | None = None
        """One row holding a prefix of the conversation (with its images) for the next turn to start from."""
        self.answer_tokens = 0
        """Tokens of the last answer (with the engine; without, ``session`` holds them)."""

    def _prompt(self, question: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not question or not question.strip():
            raise ValueError("the question is empty")
        segments = VQA.conversation(self.processor, self.turns, question, num_images=len(self.images))
        batch = self.processor([segments], [self.images])
        device = next(self.model.parameters()).device  # the inputs go where the model is
        images = None if batch["pixel_values"] is None else batch["pixel_values"].to(device)
        return batch["input_ids"].to(device), images

    def _session(self, images: torch.Tensor | None) -> Session:
        if self.session is None:
            self.session = Session(self.model, images)
        return self.session

    def on_engine(self, config: GenerationConfig) -> bool:
        """Whether a turn decoded by ``config`` runs on the engine."""
        return self.engine is not None and config.num_beams == 1 and not config.prompt_lookup

    def ask(self, question: str, config: GenerationConfig | None = None, **overrides) -> str:
        """Answer the next question; the answer becomes part of the conversation. Decoding:
        ``config`` (default: the checkpoint's question-answering defaults) and ``overrides``."""
        config = _resolve(config or VQA.generation_config(self.model), overrides)
        if self.on_engine(config):
            return "".join(self.ask_stream(question, config)).strip()
        input_ids, images = self._prompt(question)
        with torch.inference_mode():
            session = self._session(images)
            result = generate(
                self.model, None, input_ids, config=config, session=session, tokenizer=self.processor.tokenizer
            )
        answer = result.texts[0].strip()
        self.turns.append((question, answer))
        return answer

    def ask_stream(self, question: str, config: GenerationConfig | None = None, **overrides) -> Iterator[str]:
        """Like :meth:`ask`, yielding the answer's text as it is generated."""
        input_ids, images = self._prompt(question)
        config = _resolve(config or VQA.generation_config(self.model), overrides)
        if self.on_engine(config):
            yield from self._ask_engine(question, input_ids, images, config)
            return
        with torch.inference_mode():
            session = self._session(images)
        pieces = []
        for piece in stream(self.model, self.processor.tokenizer, None, input_ids, config=config, session=session):
            pieces.append(piece)
            yield piece
        self.turns.append((question, "".join(pieces).strip()))

    def _ask_engine(
        self, question: str, input_ids: torch.Tensor, images: torch.Tensor | None, config: GenerationConfig
    ) -> Iterator[str]:
        # The prompt's image ran through torch ops on this thread: let its OpenMP workers go,
        # or the engine thread's own would wait on sleeping ones (see the function).
        release_openmp_threads()
        earlier = self.session
        request = self.engine.submit(
            input_ids, None if earlier is not None else images, config, session=earlier, keep_session=True
        )
        pieces = []
        try:
            for out in request.outputs():
                if out.text:
                    pieces.append(out.text)
                    yield out.text
        finally:
            request.cancel()  # a no-op once done; a reader that stops early frees the row
        if request.session is not None:
            self.session = request.session
        if request.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"the engine ended the answer ({request.finish_reason})") from request.error
        self.answer_tokens = request.completion_tokens
        self.turns.append((question, "".join(pieces).strip()))
