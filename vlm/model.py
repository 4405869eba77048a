"""The vision-language model: frozen encoder → resampler → frozen LM with cross-attention."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VLMConfig
from .lm import MEDIA_KWARG, PREFIX_KWARG, OutputHead, PrefixState, TokenEmbedding, find_decoder
from .resampler import PerceiverResampler
from .vision import VisionEncoder
from .xattn import MediaState

IGNORE_INDEX = -100


def _pixels(pixel_values: torch.Tensor | None, images: torch.Tensor | None) -> torch.Tensor | None:
    """The image batch under either name (``images`` is the old one)."""
    if images is not None and pixel_values is not None:
        raise TypeError("pass pixel_values or images (its old name), not both")
    return pixel_values if pixel_values is not None else images


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, S, V), or None when not asked for


class VLM(nn.Module):
    """Build it with :func:`vlm.create_model_and_transforms` or :func:`vlm.from_pretrained`."""

    def __init__(
        self,
        config: VLMConfig,
        vision: VisionEncoder,
        lm: nn.Module,
        resampler: PerceiverResampler,
        image_token_id: int,
        end_of_chunk_token_id: int,
        cross_attn_layers: list[int],
        new_token_ids: list[int] | None = None,
        tied: bool | None = None,
    ):
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.resampler = resampler
        self.image_token_id = image_token_id
        self.end_of_chunk_token_id = end_of_chunk_token_id
        self.cross_attn_layers = cross_attn_layers
        base_in, base_out = lm.get_input_embeddings(), lm.get_output_embeddings()
        # Trainable rows for the added tokens, in the order config.new_tokens() lists them.
        self.embed = TokenEmbedding(base_in, new_token_ids or [image_token_id, end_of_chunk_token_id])
        if tied is None:  # an LM converted for inference (vlm.quantize) no longer shows it: pass it
            tied = base_out.weight is base_in.weight
        self.head = OutputHead(base_out, self.embed, tied, config.lm.vocab_size)
        self.generation_defaults: dict | None = None
        """The checkpoint's decoding defaults (``generation_config.json``; see :mod:`vlm.tasks`)."""
        self._decoder = [find_decoder(lm)[0]]  # a reference: it is already a submodule of lm
        # transformers renamed the decoders' cache argument (past_key_values in 5.17, cache
        # in 5.24); a wrong name lands in **kwargs unread and the cache silently stays empty.
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def decoder(self) -> nn.Module:
        return self._decoder[0]

    def train(self, mode: bool = True) -> VLM:
        super().train(mode)
        # Frozen backbones stay in eval mode: no dropout noise, no batch-norm updates.
        self.vision.eval()
        self.lm.eval()
        for layer in self.decoder_layers():
            if layer.xattn is not None:
                layer.xattn.train(mode)
        return self

    def decoder_layers(self):
        return find_decoder(self.lm)[1]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: p for name, p in self.named_parameters() if p.requires_grad}
        # The added tokens' rows are the adapter's even while a run holds them frozen
        # (a prefix cache fixes their effect below the first cross-attention layer).
        state.setdefault("embed.new_rows", self.embed.new_rows)
        if self.head.new_rows is not None:
            state.setdefault("head.new_rows", self.head.new_rows)
        return state

    @property
    def first_cross_attn_layer(self) -> int:
        """The first decoder layer that sees images: everything below it is a fixed function of the text."""
        return min(self.cross_attn_layers)

    # ------------------------------------------------------------------ pieces

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, T, C, H, W)`` (or ``(B, C, H, W)``) → latents ``(B, T, L, D_lm)``."""
        if images.ndim == 4:
            images = images[:, None]
        if images.ndim != 5:
            raise ValueError(f"images must be (B, T, C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")
        tower_param = next(self.vision.parameters())
        with torch.no_grad():
            feats = self.vision(images.to(tower_param.dtype))  # (B, T, N, Dv)
        return self.resampler(feats.to(self.resampler.latents.dtype))

    def media_state(
        self,
        latents: torch.Tensor,
        input_ids: torch.Tensor,
        last: int | None = None,
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> MediaState:
        """What the cross-attention layers need for one call: which image each position
        follows, checked against the images there are. ``input_ids`` (B, S): every token of
        the sequence so far; ``last``: the call runs only its last ``last`` positions (the
        earlier ones are in a generation cache); ``kv``: per-layer keys/values over the
        latents, computed once (a generation session's)."""
        media_index = (input_ids == self.image_token_id).cumsum(dim=1)  # (B, S)
        counts = media_index[:, -1]
        if bool((counts > latents.shape[1]).any()):
            bad = int(torch.nonzero(counts > latents.shape[1])[0, 0])
            raise ValueError(
                f"sample {bad} has {int(counts[bad])} {self.config.image_token} tokens but only "
                f"{latents.shape[1]} images were given"
            )
        if last is not None:
            media_index = media_index[:, -last:]
        only_latest = self.config.cross_attn.only_latest_image
        return MediaState(latents, media_index, only_latest, kv={} if kv is None else kv)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: MediaState | None = None,
        cache=None,
        prefix: torch.Tensor | PrefixState | None = None,
        **decoder_kwargs,
    ):
        """Run the decoder stack; returns the transformers output (``last_hidden_state`` (B, S, D)).

        ``cache`` (a transformers ``Cache``) goes to the decoder under whichever name its
        transformers version uses. ``prefix`` (B, S, D): the hidden states entering the
        first cross-attention layer, as :meth:`prefix_hidden_states` computes them; the
        layers below it are then skipped (embedding, mask and rotary tables are still
        computed by the decoder, which is cheap)."""
        embeds = self.embed(input_ids)  # (B, S, D)
        kwargs = dict(decoder_kwargs)
        if isinstance(prefix, torch.Tensor):
            prefix = PrefixState(self.first_cross_attn_layer, prefix)
        if prefix is not None:
            kwargs[PREFIX_KWARG] = prefix
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        if media is not None:
            kwargs[MEDIA_KWARG] = media
            media.visits.n = 0
        kwargs.setdefault("use_cache", False)
        out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if media is not None and media.visits.n != len(self.cross_attn_layers):
            raise RuntimeError(
                f"{type(self.lm).__name__} did not pass keyword arguments on to its decoder layers "
                f"({media.visits.n} of {len(self.cross_attn_layers)} cross-attention layers ran); "
                "this LM family is not supported"
            )
        return out

    @torch.no_grad()
    def prefix_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states entering the first cross-attention layer, (B, S, D): a fixed
        function of the text, computed exactly as :meth:`forward` computes them (same
        embedding, mask and positions); the layers from there up are skipped."""
        state = PrefixState(self.first_cross_attn_layer, capture=True)
        self.hidden_states(input_ids, attention_mask, prefix=state)
        if state.hidden is None:
            raise RuntimeError(f"{type(self.lm).__name__} did not reach layer {state.layer}")
        return state.hidden

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        prefix: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
    ) -> VLMOutput:
        """``pixel_values`` (B, T, C, H, W) (``images``: its old name); ``input_ids``,
        ``attention_mask``, ``labels`` (B, S); ``prefix`` (B, S, D), optional: see
        :meth:`hidden_states`. ``model(**processor(...))`` works as it is.

        Labels are aligned with ``input_ids`` (shifted here); ``-100`` is ignored. The loss
        is the mean over labelled tokens, or with ``label_weights`` (B, S), aligned with the
        labels, their weighted mean. With
        ``return_logits=False`` logits are computed only where labels are, which is
        what training needs and is markedly cheaper for a large vocabulary.
        """
        images = _pixels(pixel_values, images)
        if input_ids is None:
            raise TypeError("forward() needs input_ids")
        media = None
        if images is not None:
            media = self.media_state(self.encode_images(images), input_ids)
        hidden = self.hidden_states(input_ids, attention_mask, media, prefix=prefix).last_hidden_state  # (B, S, D)
        logits = self.head(hidden) if return_logits else None
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            if logits is not None:
                picked = logits[:, :-1][keep]
            else:
                picked = self.head(hidden[:, :-1][keep])  # (n_labels, V): only where the labels are
            if not picked.shape[0]:
                loss = picked.sum() * 0.0
            elif label_weights is None:
                loss = F.cross_entropy(picked.float(), targets[keep])
            else:
                weights = label_weights[:, 1:][keep].to(torch.float32)
                loss = (
                    F.cross_entropy(picked.float(), targets[keep], reduction="none") * weights
                ).sum() / weights.sum()
        return VLMOutput(loss=loss, logits=logits)

    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        **kwargs,
    ):
        """Cached generation: ``model.generate(**processor(...), max_new_tokens=8)``. A
        right-padded batch is re-padded on the left; ``labels`` (in the processor's batch)
        are not used. Options not given come from the checkpoint's ``generation_config.json``
        (its top level). See :func:`vlm.generate.generate` for the options."""
        from .generate import GenerationConfig, generate  # generate.py builds on this module

        del labels
        if input_ids is None:
            raise TypeError("generate() needs input_ids")
        shared = {k: v for k, v in (self.generation_defaults or {}).items() if k != "tasks"}
        if shared and kwargs.get("config") is None:
            kwargs["config"] = GenerationConfig().replace(**shared)
        if attention_mask is not None:
            # A stable sort of the mask moves each row's padding to its front, tokens in order.
            order = attention_mask.argsort(dim=1, stable=True)
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        return generate(self, _pixels(pixel_values, images), input_ids, attention_mask, **kwargs)

    @torch.no_grad()
    def greedy_generate(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        stop_token_ids: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Plain greedy decoding by full recomputation at every step, batch of one: the
        slow reference that tests hold the cached :meth:`generate` against."""
        if input_ids.shape[0] != 1:
            raise ValueError("greedy_generate takes a batch of one")
        latents = self.encode_images(images) if images is not None else None
        ids = input_ids
        for _ in range(max_new_tokens):
            media = self.media_state(latents, ids) if latents is not None else None
            hidden = self.hidden_states(ids, None, media).last_hidden_state
            nxt = self.head(hidden[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) in stop_token_ids:
                break
        return ids[:, input_ids.shape[1] :]
