"""Turning images and text into model inputs, with label masks.

A sample is a list of text segments, each trained on or not, plus its images in
the order of the ``<image>`` markers in the text. Padding, media tokens and the
prompt part of question-answer samples never get a label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .model import IGNORE_INDEX

# Task prompts shared by the data pipeline and the applications.
CAPTION_PROMPT = "Describe the image in one sentence."
SKETCH_PROMPT = "Write the HTML for this sketch."


@dataclass
class Segment:
    text: str
    trained: bool


class Processor:
    """Tokenizer + image transform of one model. Call it on a batch of samples."""

    def __init__(
        self,
        tokenizer,
        image_transform,
        image_token: str = "<image>",
        end_of_chunk_token: str = "<|endofchunk|>",
        system_prompt: str | None = None,
        max_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token = image_token
        self.end_of_chunk_token = end_of_chunk_token
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ------------------------------------------------------------ text formats

    def caption_segments(self, caption: str, prompt: str = "") -> list[Segment]:
        """``<image>{prompt}{caption}<|endofchunk|>``; only the caption and the end marker train."""
        return [Segment(self.image_token + prompt, False), Segment(caption + self.end_of_chunk_token, True)]

    def interleaved_segments(self, text: str) -> list[Segment]:
        """Free text with ``<image>`` markers, all trained (media tokens excepted)."""
        return [Segment(text, True)]

    def caption_prompt(self, prompt: str = "") -> list[Segment]:
        """Inference form of :meth:`caption_segments`: the model continues with a caption."""
        return [Segment(self.image_token + prompt, False)]

    def chat_segments(
        self,
        turns: Sequence[tuple[str, str | None]],
        num_images: int = 1,
        images_per_turn: Sequence[int] | None = None,
    ) -> list[Segment]:
        """Question/answer turns; images are shown at the start of a user message.

        By default ``num_images`` images come before the first question;
        ``images_per_turn`` gives a count for every turn instead. With a chat template
        (e.g. ChatML) the LM's own format is used; otherwise
        ``Question: … Answer: …<|endofchunk|>``. The last answer may be ``None``: the
        segments then end with the prompt for the model to answer (inference).
        """
        if not turns:
            raise ValueError("a chat sample needs at least one (question, answer) turn")
        if images_per_turn is None:
            images_per_turn = [num_images] + [0] * (len(turns) - 1)
        if len(images_per_turn) != len(turns):
            raise ValueError(f"{len(turns)} turns but {len(images_per_turn)} image counts")
        if any(a is None for _, a in turns[:-1]):
            raise ValueError("only the last turn may lack an answer")
        if not self.uses_chat_template:
            segments = []
            for i, (q, a) in enumerate(turns):
                lead = self.image_token * images_per_turn[i] if images_per_turn[i] else ("" if i == 0 else " ")
                segments.append(Segment(f"{lead}Question: {q} Answer:", False))
                if a is not None:
                    segments.append(Segment(f" {a}{self.end_of_chunk_token}", True))
            return segments
        messages: list[dict[str, str]] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        segments, rendered = [], ""
        for i, (q, a) in enumerate(turns):
            messages.append({"role": "user", "content": self.image_token * images_per_turn[i] + q})
            prompt = self._render(messages, add_generation_prompt=True)
            segments.append(Segment(prompt[len(rendered) :], False))
            rendered = prompt
            if a is None:
                break
            messages.append({"role": "assistant", "content": a})
            full = self._render(messages, add_generation_prompt=False)
            if not full.startswith(rendered):
                raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix")
            segments.append(Segment(full[len(rendered) :], True))
            rendered = full
        return segments

    def few_shot_segments(self, examples: Sequence[tuple[str, str]], query: str, style: str = "chat") -> list[Segment]:
        """k in-context examples, each one image with a (prompt, answer), then the query
        prompt with its image: k + 1 images in all, in that order.

        ``style="chat"`` uses :meth:`chat_segments` (one turn per example);
        ``style="caption"`` is Flamingo's plain interleaving,
        ``<image>{prompt}{answer}<|endofchunk|>…<image>{query}``.
        """
        if style == "caption":
            segments = [seg for prompt, answer in examples for seg in self.caption_segments(answer, prompt)]
            return segments + self.caption_prompt(query)
        if style != "chat":
            raise ValueError(f"style must be 'chat' or 'caption', got {style!r}")
        turns = [*examples, (query, None)]
        return self.chat_segments(turns, images_per_turn=[1] * len(turns))

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------ tensors

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample."""
        ids: list[int] = []
        labels: list[int] = []
        for seg in segments:
            if not seg.text:
                continue
            piece = self.tokenizer(seg.text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if seg.trained else [IGNORE_INDEX] * len(piece))
        labels = [IGNORE_INDEX if t == self.image_token_id else lab for t, lab in zip(ids, labels)]
        if self.max_length is not None:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    def transform_images(self, images: Sequence[Image.Image], sample: int = 0) -> list[torch.Tensor]:
        out = []
        for j, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"sample {sample}, image {j}: expected a PIL image, got {type(image).__name__}")
            out.append(self.image_transform(image.convert("RGB")))
        return out

    def __call__(
        self,
        samples: Sequence[Sequence[Segment] | str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor | None]:
        """A padded batch: ``input_ids``, ``attention_mask``, ``labels`` (B, S) and
        ``images`` (B, T, C, H, W) (zeros where a sample has fewer than T images; ``None``
        when no sample has an image). A plain string sample is interleaved text."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = images if images is not None else [[] for _ in samples]
        if len(images) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(images)} image lists")
        encoded, pixel_lists = [], []
        for i, (sample, imgs) in enumerate(zip(samples, images)):
            segments = self.interleaved_segments(sample) if isinstance(sample, str) else sample
            ids, labels = self.encode(segments)
            n_markers = sum(t == self.image_token_id for t in ids)
            full_markers = sum(seg.text.count(self.image_token) for seg in segments)
            if full_markers != len(imgs):
                raise ValueError(f"sample {i} has {full_markers} {self.image_token} markers but {len(imgs)} images")
            encoded.append((ids, labels))
            pixel_lists.append(self.transform_images(imgs, i)[:n_markers])
        return self.collate(encoded, pixel_lists, padding_side)

    def collate(self, encoded, pixel_lists, padding_side: str = "right") -> dict[str, torch.Tensor | None]:
        length = max(len(ids) for ids, _ in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labs) in enumerate(encoded):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            labels[i, span] = torch.tensor(labs, dtype=torch.long)
            attention_mask[i, span] = 1
        max_images = max(len(p) for p in pixel_lists)
        pixels = None
        if max_images:
            ref = next(p[0] for p in pixel_lists if p)
            pixels = ref.new_zeros((batch, max_images, *ref.shape))
            for i, plist in enumerate(pixel_lists):
                for j, px in enumerate(plist):
                    pixels[i, j] = px
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": pixels}
