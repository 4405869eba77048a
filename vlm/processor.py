"""Turning images and text into model inputs, with label masks.

A sample is a list of text segments, each trained on or not, plus its images in
the order of the ``<image>`` markers in the text. Padding, media tokens and the
prompt part of question-answer samples never get a label. Which format and prompt a
task uses is :mod:`vlm.tasks`' business; this module provides the formats.

Control tokens (``<image>``, ``<|endofchunk|>``, a chat template's ``<|im_start|>`` and
every other added token of the tokenizer) come only from the processor's own structure:
the markers it places and the chat template's markup. Text from users and data goes
through :meth:`Processor.escape`, so that a question or caption that contains, say,
``<|im_end|>`` is tokenised as those characters and can neither add an image slot nor
end a chat turn.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .model import IGNORE_INDEX

# Unicode noncharacters, reserved for a program's internal use: real text does not carry
# them (escape() strips any that it does). They wrap a control token's text inside
# untrusted text and, unlike a list of spans, survive rendering through a chat template.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
# A wrapped piece, or a lone marker (a template that split a wrapped token): splitting on
# this gives [markup, escaped, markup, escaped, ..., markup], None for a lone marker.
_ESCAPED = re.compile(f"{_OPEN}([^{_OPEN}{_CLOSE}]*){_CLOSE}|[{_OPEN}{_CLOSE}]")


class Batch(dict):
    """What the processor returns: a dict of tensors (``model(**batch)`` and
    ``model.generate(**batch)`` take it as it is) with :meth:`to`. The images are under
    ``pixel_values``; the old key ``images`` still reads them, with a deprecation warning,
    until the next release."""

    def __getitem__(self, key):
        if key == "images" and "images" not in self:
            warnings.warn('batch["images"] is deprecated; the key is "pixel_values"', DeprecationWarning, stacklevel=2)
            key = "pixel_values"
        return super().__getitem__(key)

    def to(self, device: torch.device | str) -> Batch:
        """The batch with every tensor on ``device``."""
        return Batch({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


@dataclass
class Segment:
    """Part of a sample. ``text`` is markup: a control token written in it is that token.
    Untrusted text belongs in it only as :meth:`Processor.escape` returns it."""

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
        # Every special token, and every other added token but whitespace ones (some
        # tokenizers add runs of newlines as tokens; they are text, not structure). Read
        # once: tokens added to the tokenizer later (the factory adds <image> first) are missed.
        self._control_ids: dict[str, int] = {
            token.content: i
            for i, token in tokenizer.added_tokens_decoder.items()
            if token.special or not token.content.isspace()
        }
        longest_first = sorted(self._control_ids, key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    # ------------------------------------------------------------ untrusted text

    def escape(self, text: str) -> str:
        """``text`` from a user or a data set, ready to go into a :class:`Segment`: the
        text of any control token in it (``<image>``, ``<|im_end|>``, ...) is marked so
        that :meth:`encode` tokenises it as plain characters. Text without control tokens
        comes back unchanged, so it keeps exactly the tokens it always had."""
        text = text.replace(_OPEN, "").replace(_CLOSE, "")  # so nobody can forge a wrapped piece
        if self._control is None:
            return text
        return self._control.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", text)

    # ------------------------------------------------------------ text formats

    def caption_segments(self, caption: str, prompt: str = "") -> list[Segment]:
        """``<image>{prompt}{caption}<|endofchunk|>``; only the caption and the end marker train."""
        return [
            Segment(self.image_token + self.escape(prompt), False),
            Segment(self.escape(caption) + self.end_of_chunk_token, True),
        ]

    def interleaved_segments(self, document: str | Sequence[Mapping[str, object]]) -> list[Segment]:
        """A document of text and images, all trained (media tokens excepted).

        A list of items, as in interleaved shards (``{"text": ...}`` or ``{"image": name}``),
        is data: the processor places ``<image>`` before each image and ``<|endofchunk|>``
        after the text that follows it, and every text item stays text, whatever it
        contains. A string is markup written by a program (a test, a benchmark prompt):
        its ``<image>`` and ``<|endofchunk|>`` are structure, so never pass data text as one.
        """
        if isinstance(document, str):
            return [Segment(document, True)]
        parts, open_chunk = [], False
        for item in document:
            if "image" in item:
                parts.append((self.end_of_chunk_token if open_chunk else "") + self.image_token)
                open_chunk = True
            else:
                parts.append(self.escape(str(item["text"])))
        if open_chunk:
            parts.append(self.end_of_chunk_token)
        return [Segment("".join(parts), True)]

    def caption_prompt(self, prompt: str = "") -> list[Segment]:
        """Inference form of :meth:`caption_segments`: the model continues with a caption."""
        return [Segment(self.image_token + self.escape(prompt), False)]

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
        Questions, answers and the system prompt are text: only the format's own markup
        and the image markers become control tokens.
        """
        if not turns:
            raise ValueError("a chat sample needs at least one (question, answer) turn")
        if images_per_turn is None:
            images_per_turn = [num_images] + [0] * (len(turns) - 1)
        if len(images_per_turn) != len(turns):
            raise ValueError(f"{len(turns)} turns but {len(images_per_turn)} image counts")
        if any(a is None for _, a in turns[:-1]):
            raise ValueError("only the last turn may lack an answer")
        turns = [(self.escape(q), None if a is None else self.escape(a)) for q, a in turns]
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
            messages.append({"role": "system", "content": self.escape(self.system_prompt)})
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

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of segment text: markup as the tokenizer reads it, escaped pieces as
        plain characters. Text with nothing escaped is one ordinary tokenizer call."""
        ids: list[int] = []
        for i, piece in enumerate(_ESCAPED.split(text)):
            if piece:
                ids += self._plain_ids(piece) if i % 2 else self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        """``text`` as characters, matching none of the tokenizer's added tokens."""
        # After a newline, which is then cut off again: a SentencePiece-style pre-tokenizer
        # would otherwise prepend the space it puts at the start of a text (transformers'
        # own sanitize_control_tokens does the same).
        newline = self._without_added_tokens("\n")
        ids = self._without_added_tokens("\n" + text)
        ids = ids[len(newline) :] if ids[: len(newline)] == newline else self._without_added_tokens(text)
        if self._control_ids.get(text) in ids:
            raise ValueError(f"cannot keep {text!r} as text: this tokenizer makes the token from plain characters")
        return ids

    def _without_added_tokens(self, text: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: its own switch, which skips special tokens only
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # The backend's pipeline minus its added-token matching. Not split_special_tokens=True:
        # on a fast tokenizer that flips a flag on the shared backend for the call (a race
        # with other threads' calls) and still matches non-special added tokens.
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [token.id for word in words for token in backend.model.tokenize(word)]

    def _encode_all(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for seg in segments:
            if not seg.text:
                continue
            piece = self._text_ids(seg.text)
            ids.extend(piece)
            labels.extend(piece if seg.trained else [IGNORE_INDEX] * len(piece))
        labels = [IGNORE_INDEX if t == self.image_token_id else lab for t, lab in zip(ids, labels)]
        return ids, labels

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is None:
            return ids, labels
        return ids[: self.max_length], labels[: self.max_length]

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample."""
        return self._truncate(*self._encode_all(segments))

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
    ) -> Batch:
        """A padded batch: ``input_ids``, ``attention_mask``, ``labels`` (B, S) and
        ``pixel_values`` (B, T, C, H, W) (zeros where a sample has fewer than T images;
        ``None`` when no sample has an image). A plain string sample is interleaved text.
        Generation takes either padding side (a right-padded batch is re-padded on the left)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = images if images is not None else [[] for _ in samples]
        if len(images) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(images)} image lists")
        encoded, pixel_lists = [], []
        for i, (sample, imgs) in enumerate(zip(samples, images)):
            segments = self.interleaved_segments(sample) if isinstance(sample, str) else sample
            # Count the image tokens, not "<image>" in the text: escaped text is not a marker.
            ids, labels = self._encode_all(segments)
            full_markers = ids.count(self.image_token_id)
            if full_markers != len(imgs):
                raise ValueError(f"sample {i} has {full_markers} {self.image_token} markers but {len(imgs)} images")
            ids, labels = self._truncate(ids, labels)
            n_markers = ids.count(self.image_token_id)
            encoded.append((ids, labels))
            pixel_lists.append(self.transform_images(imgs, i)[:n_markers])
        return self.collate(encoded, pixel_lists, padding_side)

    def collate(self, encoded, pixel_lists, padding_side: str = "right") -> Batch:
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
        return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixels)
