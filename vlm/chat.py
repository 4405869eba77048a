"""A multi-turn conversation about one set of images, for the demo and scripts.

The image is encoded once per conversation and each new turn runs only its new
tokens: the conversation is re-rendered in the LM's chat format every turn, and the
generation session reuses the longest prefix it has already computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from .generate import GenerationConfig, Session, generate, stream
from .model import VLM
from .processor import Processor
from .tasks import VQA


class Chat:
    """Holds one conversation's state; the model stays shared and untouched."""

    def __init__(self, model: VLM, processor: Processor, images: Sequence[Image.Image] = ()):
        self.model = model
        self.processor = processor
        self.images = list(images)
        self.turns: list[tuple[str, str]] = []
        self.session: Session | None = None

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

    def ask(self, question: str, config: GenerationConfig | None = None, **overrides) -> str:
        """Answer the next question; the answer becomes part of the conversation. Decoding:
        ``config`` (default: the checkpoint's question-answering defaults) and ``overrides``."""
        input_ids, images = self._prompt(question)
        config = config or VQA.generation_config(self.model)
        with torch.inference_mode():
            session = self._session(images)
            result = generate(
                self.model,
                None,
                input_ids,
                config=config,
                session=session,
                tokenizer=self.processor.tokenizer,
                **overrides,
            )
        answer = result.texts[0].strip()
        self.turns.append((question, answer))
        return answer

    def ask_stream(self, question: str, config: GenerationConfig | None = None, **overrides) -> Iterator[str]:
        """Like :meth:`ask`, yielding the answer's text as it is generated."""
        input_ids, images = self._prompt(question)
        config = config or VQA.generation_config(self.model)
        with torch.inference_mode():
            session = self._session(images)
        pieces = []
        for piece in stream(
            self.model, self.processor.tokenizer, None, input_ids, config=config, session=session, **overrides
        ):
            pieces.append(piece)
            yield piece
        self.turns.append((question, "".join(pieces).strip()))
