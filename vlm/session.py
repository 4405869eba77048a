"""Per-request generation state: media, cross-attention K/V, the LM cache, tokens fed.

The caller holds a :class:`Session`; the model is never written to, so many sessions
can share one model (see ``vlm/generate.py`` for the decoding loop around it).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .model import VLM
from .xattn import MediaState


class Session:
    """Per-request state of one batch: media, cross-attention K/V, LM cache, tokens fed.

    ``cache_media_kv=False`` recomputes the cross-attention keys/values at every step
    (OpenFlamingo's behaviour) and ``use_cache=False`` reruns the whole sequence at
    every step; both exist as baselines for ``benchmarks/generate.py``.
    """

    def __init__(
        self,
        model: VLM,
        images: torch.Tensor | None,
        cache_media_kv: bool = True,
        use_cache: bool = True,
    ):
        self.model = model
        self.use_cache = use_cache
        self.latents = model.encode_images(images) if images is not None else None  # (B, T, L, D)
        self.media_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.latents is not None and cache_media_kv:
            for layer in model.decoder_layers():
                if layer.xattn is not None:
                    self.media_kv[layer.index] = layer.xattn.media_kv(self.latents)
        self.cache = DynamicCache(config=model.lm.config) if use_cache else None
        self.ids: torch.Tensor | None = None  # (B, S) every token fed so far
        self.attention_mask: torch.Tensor | None = None  # (B, S)

    @property
    def length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    def feed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, every_position: bool = False
    ) -> torch.Tensor:
        """Append tokens ``(B, S_new)``; returns the next-token logits ``(B, V)``, or with
        ``every_position`` the logits after each new token ``(B, S_new, V)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.ids is not None:
            input_ids_all = torch.cat([self.ids, input_ids], dim=1)
            mask_all = torch.cat([self.attention_mask, attention_mask.to(self.attention_mask.dtype)], dim=1)
        else:
            input_ids_all, mask_all = input_ids, attention_mask
        if self.latents is not None and bool(
            ((input_ids_all == self.model.image_token_id).sum(1) > self.latents.shape[1]).any()
        ):
            raise ValueError(f"more {self.model.config.image_token} tokens than images in this session")
        # Left padding: positions count real tokens only.
        positions = (mask_all.cumsum(1) - 1).clamp(min=0)
        run_ids = input_ids if self.use_cache else input_ids_all
        media = None
        if self.latents is not None:
            media_index = (input_ids_all == self.model.image_token_id).cumsum(1)[:, -run_ids.shape[1] :]
            only_latest = self.model.config.cross_attn.only_latest_image
            media = MediaState(self.latents, media_index, only_latest, kv=self.media_kv)
        out = self.model.hidden_states(
            run_ids,
            mask_all,
            media,
            position_ids=positions[:, -run_ids.shape[1] :],
            cache=self.cache,
            use_cache=self.use_cache,
        )
        if self.cache is not None and self.cache.get_seq_length() == 0:
            raise RuntimeError(
                f"{type(self.model.lm).__name__} did not fill the cache it was given (transformers "
                "version mismatch?); cached generation would be wrong. Install the pinned transformers "
                "or pass use_cache=False"
            )
        self.ids, self.attention_mask = input_ids_all, mask_all
        if every_position:
            return self.model.head(out.last_hidden_state[:, -input_ids.shape[1] :])  # (B, S_new, V)
        return self.model.head(out.last_hidden_state[:, -1])  # (B, V)

    def rewind(self, length: int) -> None:
        """Forget every token after the first ``length`` (crops the LM cache)."""
        if length < self.length:
            if self.cache is not None:
                self.cache.crop(length - self.length)
            self.ids = self.ids[:, :length] if length else None
            self.attention_mask = self.attention_mask[:, :length] if length else None

    def extend_to(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Make the session hold exactly ``input_ids`` (1, S), reusing the longest common
        prefix already fed: a new chat turn runs only its new tokens."""
        if input_ids.shape[0] != 1:
            raise ValueError("extend_to takes a batch of one")
        common = 0
        if self.ids is not None:
            n = min(self.length, input_ids.shape[1] - 1)  # always feed at least one token
            same = (self.ids[0, :n] == input_ids[0, :n]).long()
            common = int(same.cumprod(0).sum())
        self.rewind(common)
        return self.feed(input_ids[:, common:])

    def repeat_interleave(self, k: int) -> None:
        """Each sample becomes k consecutive rows (for beam search)."""
        if self.cache is not None:
            self.cache.batch_repeat_interleave(k)
        self.ids = self.ids.repeat_interleave(k, 0)
        self.attention_mask = self.attention_mask.repeat_interleave(k, 0)
        if self.latents is not None:
            self.latents = self.latents.repeat_interleave(k, 0)
            self.media_kv = {
                i: (a.repeat_interleave(k, 0), b.repeat_interleave(k, 0)) for i, (a, b) in self.media_kv.items()
            }

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows``, media included (after beam search: one row per sample)."""
        self.select(rows)
        if self.latents is not None:
            self.latents = self.latents[rows]
            self.media_kv = {i: (a[rows], b[rows]) for i, (a, b) in self.media_kv.items()}

    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` in this order (beam reordering). Beams never move between samples,
        so the media tensors, identical within a sample, need no reordering."""
        if self.cache is not None:
            self.cache.reorder_cache(rows)
        self.ids = self.ids[rows]
        self.attention_mask = self.attention_mask[rows]
