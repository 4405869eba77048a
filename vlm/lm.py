"""Adapting a Hugging Face causal LM by composition.

Every decoder layer is wrapped in a :class:`CrossAttnDecoderLayer` placed in the
LM's own layer list; chosen ones hold a gated cross-attention block that runs before
the original layer. The per-call :class:`~vlm.xattn.MediaState` reaches the layers as
a keyword argument: current transformers decoders forward ``**kwargs`` to every
layer, and wrapping all layers keeps that keyword away from the original ones.
New tokens (``<image>``, ``<|endofchunk|>``) get their own small embedding; the
original table stays frozen and untouched.

A per-call :class:`PrefixState` (keyword :data:`PREFIX_KWARG`) starts the stack at its
layer ``L``: layers below it hand their input on untouched, and layer ``L`` takes the
given hidden states instead of its input (a training cache of the frozen prefix), or,
in capture mode, records its input and the layers from ``L`` up hand theirs on.
"""

from __future__ import annotations

import torch
from torch import nn

from .xattn import GatedCrossAttentionBlock, MediaState

MEDIA_KWARG = "vlm_media"
PREFIX_KWARG = "vlm_prefix"


class PrefixState:
    """Hidden states entering decoder layer ``layer`` for one call.

    ``hidden`` (B, S, D) given: layers below ``layer`` are skipped and ``layer`` starts
    from it. ``capture=True``: ``layer`` stores its input in ``hidden`` and it and the
    layers above are skipped. A plain object on purpose: FSDP casts and copies tensors
    and dataclasses in a call's arguments, and the capture must land in this one."""

    def __init__(self, layer: int, hidden: torch.Tensor | None = None, capture: bool = False):
        if (hidden is None) != capture:
            raise ValueError("give either the hidden states or capture=True")
        self.layer = layer
        self.hidden = hidden
        self.capture = capture


# Whether a decoder layer class returns a tuple (older families) or a tensor (Llama and
# most others in transformers 5), learnt from its first real call.
_RETURNS_TUPLE: dict[type, bool] = {}


class CrossAttnDecoderLayer(nn.Module):
    """An original decoder layer, optionally preceded by a gated cross-attention block."""

    def __init__(self, decoder_layer: nn.Module, index: int, xattn: GatedCrossAttentionBlock | None):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.xattn = xattn
        self.index = index

    def forward(self, *args, **kwargs):
        media: MediaState | None = kwargs.pop(MEDIA_KWARG, None)
        prefix: PrefixState | None = kwargs.pop(PREFIX_KWARG, None)
        if prefix is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            skip = self.index < prefix.layer if not prefix.capture else self.index >= prefix.layer
            if prefix.capture and self.index == prefix.layer:
                prefix.hidden = hidden
            if skip:
                return self._pass_on(hidden, args, kwargs)
            if self.index == prefix.layer:
                start = prefix.hidden.to(hidden.dtype)  # (B, S, D)
                args, kwargs = self._with_hidden(start, args, kwargs)
        if self.xattn is not None and media is not None:
            media.visits.n += 1
            if args:
                args = (self.xattn(args[0], media, self.index), *args[1:])
            else:
                kwargs["hidden_states"] = self.xattn(kwargs["hidden_states"], media, self.index)
        out = self.decoder_layer(*args, **kwargs)
        _RETURNS_TUPLE.setdefault(type(self.decoder_layer), isinstance(out, tuple))
        return out

    @staticmethod
    def _with_hidden(hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _pass_on(self, hidden: torch.Tensor, args: tuple, kwargs: dict):
        """The layer's input as its output, in the form the wrapped layer returns."""
        kind = type(self.decoder_layer)
        if kind not in _RETURNS_TUPLE:  # once per layer class: run it to see what it returns
            with torch.no_grad():
                _RETURNS_TUPLE[kind] = isinstance(self.decoder_layer(*args, **kwargs), tuple)
        return (hidden,) if _RETURNS_TUPLE[kind] else hidden

    def __getattr__(self, name: str):
        # Model code sometimes reads attributes of its layers (e.g. attention_type).
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "decoder_layer" not in modules:
                raise
            return getattr(modules["decoder_layer"], name)


def find_decoder(lm: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The LM's decoder stack (embeddings → layers → final norm) and its layer list."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    config = getattr(lm, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if decoder is not None:
        lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if n is not None:
            lists = [m for m in lists if len(m) == n]
        if len(lists) == 1:
            return decoder, lists[0]
    raise ValueError(
        f"cannot find the decoder layers of {type(lm).__name__}: expected get_decoder() to return a "
        f"module holding one nn.ModuleList of its {n} layers. This LM family is not supported."
    )


def check_supported_lm(lm: nn.Module) -> None:
    """Refuse families whose logits are more than output-embedding(hidden): we compute
    logits ourselves (only where needed), so post-processing would be silently lost."""
    config = lm.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(lm).__name__} post-processes its logits ({attr}={value}); not supported yet")
    if lm.get_output_embeddings() is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings; is it a causal LM?")


def insert_cross_attention(layers: nn.ModuleList, indices: list[int], make_block) -> list[CrossAttnDecoderLayer]:
    """Wrap every layer of ``layers`` in place; ``make_block()`` builds each cross-attention block."""
    wanted = set(indices)
    wrapped = []
    for i, layer in enumerate(layers):
        if isinstance(layer, CrossAttnDecoderLayer):
            raise ValueError("this LM already has cross-attention layers")
        wrapper = CrossAttnDecoderLayer(layer, i, make_block() if i in wanted else None)
        layers[i] = wrapper
        wrapped.append(wrapper)
    return wrapped


class TokenEmbedding(nn.Module):
    """The frozen input embedding plus trainable rows for the added tokens."""

    def __init__(self, base: nn.Embedding, new_token_ids: list[int]):
        super().__init__()
        self.base = base
        self.base_rows = base.num_embeddings
        weight = base.weight.detach()
        # New rows start at the mean of the old ones: a plausible token, not noise.
        init = weight.float().mean(0, keepdim=True).repeat(len(new_token_ids), 1)
        self.new_rows = nn.Parameter(init)
        size = max(self.base_rows, max(new_token_ids) + 1)
        lookup = torch.full((size,), -1, dtype=torch.long)
        lookup[torch.tensor(new_token_ids)] = torch.arange(len(new_token_ids))
        self.register_buffer("new_index", lookup, persistent=False)
        self.register_buffer("new_ids", torch.tensor(new_token_ids), persistent=False)
        self.vocab_size = size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        k = self.new_index[input_ids]  # (B, S); -1 for original tokens
        out = self.base(input_ids.clamp(max=self.base_rows - 1))
        new = self.new_rows[k.clamp(min=0)].to(out.dtype)
        return torch.where((k >= 0)[..., None], new, out)


class OutputHead(nn.Module):
    """The frozen LM head plus scores for the added tokens.

    When the LM ties input and output embeddings, the added tokens' output rows are
    their input rows; otherwise they get rows of their own. ``vocab_size`` (the config's
    ``lm.vocab_size``) drops the scores of ids from there up (an LM's padding rows).
    """

    def __init__(self, base: nn.Module, embedding: TokenEmbedding, tied: bool, vocab_size: int | None = None):
        super().__init__()
        self.base = base
        self.embedding = [embedding]  # a reference, not a submodule: its rows are saved once
        self.tied = tied
        self.new_rows = None if tied else nn.Parameter(embedding.new_rows.detach().clone())
        self.vocab_size = vocab_size or embedding.vocab_size
        self._follows: dict[int, bool] = {}  # LM vocabulary size -> whether the added ids follow it
        if int(embedding.new_ids.max()) >= self.vocab_size:
            raise ValueError(
                f"added token ids reach {int(embedding.new_ids.max())}, beyond vocab_size {self.vocab_size}"
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)  # (..., V_lm)
        emb = self.embedding[0]
        rows = emb.new_rows if self.tied else self.new_rows
        new = (hidden.to(rows.dtype) @ rows.t()).to(logits.dtype)  # (..., K)
        if self._follow(logits.shape[-1]):
            # The added ids come right after the LM's and end the vocabulary: one copy of the
            # scores, where padding then index_copy makes two (benchmarks: docs/serving.md).
            return torch.cat([logits, new], dim=-1)
        extra = self.vocab_size - logits.shape[-1]
        if extra > 0:
            logits = nn.functional.pad(logits, (0, extra), value=torch.finfo(logits.dtype).min)
        elif extra < 0:
            logits = logits[..., : self.vocab_size]
        return logits.index_copy(-1, emb.new_ids, new)

    def _follow(self, lm_vocab: int) -> bool:
        """Whether the added ids are exactly ``lm_vocab, lm_vocab + 1, ... vocab_size - 1``."""
        known = self._follows.get(lm_vocab)
        if known is None:
            ids = self.embedding[0].new_ids
            expected = torch.arange(lm_vocab, max(lm_vocab, self.vocab_size), device=ids.device)
            known = self._follows[lm_vocab] = ids.shape == expected.shape and bool((ids == expected).all())
        return known
