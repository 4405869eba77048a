"""Per-request generation state: media, cross-attention K/V, the LM cache, tokens fed.

The caller holds a :class:`Session`; the model is never written to, so many sessions
can share one model (see ``vlm/generate.py`` for the decoding loop around it). The LM
cache is transformers' ``DynamicCache`` whose full-attention layers are
:class:`GrowingLayer`: a step writes its keys and values in place instead of copying the
whole cache to append them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from .model import VLM


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
        latents: torch.Tensor | None = None,
    ):
        """``images`` (B, T, C, H, W), or ``latents`` (B, T, L, D) that
        :meth:`VLM.encode_images` already made from them (a batch encoded at once), or neither."""
        if images is not None and latents is not None:
            raise ValueError("give a session its images or their latents, not both")
        self.model = model
        self.use_cache = use_cache
        self.latents = model.encode_images(images) if images is not None else latents  # (B, T, L, D)
        self.media_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.latents is not None and cache_media_kv:
            for layer in model.decoder_layers():
                if layer.xattn is not None:
                    self.media_kv[layer.index] = layer.xattn.media_kv(self.latents)
        self.cache = _new_cache(model.lm.config) if use_cache else None
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
        run_ids = input_ids if self.use_cache else input_ids_all
        media = None
        if self.latents is not None:  # checks the image markers against the images, before anything runs
            media = self.model.media_state(self.latents, input_ids_all, last=run_ids.shape[1], kv=self.media_kv)
        # Left padding: positions count real tokens only.
        positions = (mask_all.cumsum(1) - 1).clamp(min=0)
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

    # ------------------------------------------------------------------ rows of a running batch
    # Continuous batching (vlm/engine.py): a request is prefilled in a session of its own,
    # joins the running batch with :meth:`concat` and leaves it with :meth:`keep`;
    # :meth:`trim_padding` then drops the padding that only departed rows needed.

    @classmethod
    def concat(cls, sessions: list[Session], pad_token_id: int = 0) -> Session:
        """One session holding the rows of ``sessions`` in order (on one model). Shorter ones
        are left-padded: masked ids and zero cache slots, so each row's positions (which count
        real tokens) and attention stay its own. An unfed session (one row when it has no
        images) becomes rows of padding only, to be fed next: prompts prefilled as one batch.

        Images are padded to the most any row has, with zero latents and keys/values that the
        cross-attention mask never lets a token reach (a row's ``<image>`` count bounds it).
        Rows of sessions without images get zero images too: a row with no ``<image>`` passes
        the cross-attention blocks untouched (``MediaState.rows_without_media``), exactly as
        in a session without images, so both kinds share one batch."""
        if not sessions:
            raise ValueError("concat takes at least one session")
        first = sessions[0]
        if any(s.model is not first.model or not s.use_cache or s.cache is None for s in sessions):
            raise ValueError("concat takes cached sessions of one model")
        if pad_token_id == first.model.image_token_id:
            raise ValueError("the pad token must not be the image token")
        with_images = [s for s in sessions if s.latents is not None]
        if len({frozenset(s.media_kv) for s in with_images}) > 1:
            raise ValueError("concat takes sessions that all cache their media keys/values, or none")
        # An unfed session's rows are its images'; one without images either has none yet: one row.
        rows = [
            s.ids.shape[0] if s.ids is not None else s.latents.shape[0] if s.latents is not None else 1
            for s in sessions
        ]
        length = max(s.length for s in sessions)
        fed = [s for s in sessions if s.ids is not None]
        merged = copy.copy(first)
        merged.ids = merged.attention_mask = None
        merged.cache = _new_cache(first.model.lm.config)
        if fed:
            template = _plain_cache_layers(fed[0].cache)
            layers = [_plain_cache_layers(s.cache) if s.ids is not None else None for s in sessions]

            def left(t: torch.Tensor | None, n: int, s: Session, dim: int, value=0, like=None) -> torch.Tensor:
                if t is None:  # an unfed session: padding only
                    shape = list(like.shape)
                    shape[0], shape[dim] = n, length
                    return like.new_full(shape, value)
                pad = length - s.length
                if pad == 0:
                    return t
                shape = list(t.shape)
                shape[dim] = pad
                return torch.cat([t.new_full(shape, value), t], dim=dim)

            ref = fed[0]
            merged.ids = torch.cat([left(s.ids, n, s, 1, pad_token_id, ref.ids) for s, n in zip(sessions, rows)])
            merged.attention_mask = torch.cat(
                [left(s.attention_mask, n, s, 1, 0, ref.attention_mask) for s, n in zip(sessions, rows)]
            )
            merged.cache = _new_cache(
                first.model.lm.config,
                [
                    tuple(
                        torch.cat(
                            [
                                left(getattr(ls[j], part) if ls else None, n, s, 2, 0, getattr(template[j], part))
                                for s, ls, n in zip(sessions, layers, rows)
                            ]
                        )
                        for part in ("keys", "values")
                    )
                    for j in range(len(template))
                ],
            )
        merged.latents, merged.media_kv = None, {}
        if with_images:
            ref = with_images[0]
            images = max(s.latents.shape[1] for s in with_images)
            per_image = ref.latents.shape[2]

            def more(
                t: torch.Tensor | None, n: int, dim: int, per: int, s: Session, like: torch.Tensor
            ) -> torch.Tensor:
                have = 0 if s.latents is None else s.latents.shape[1]
                if t is None:  # a session without images: zero images only
                    t = like.new_zeros((n, *like.shape[1:dim], 0, *like.shape[dim + 1 :]))
                extra = (images - have) * per
                if extra == 0:
                    return t
                shape = list(t.shape)
                shape[dim] = extra
                return torch.cat([t, t.new_zeros(shape)], dim=dim)

            merged.latents = torch.cat(
                [more(s.latents, n, 1, 1, s, ref.latents) for s, n in zip(sessions, rows)]
            )  # (B, T, L, D)
            merged.media_kv = {
                i: tuple(
                    torch.cat(
                        [
                            more(
                                s.media_kv[i][part] if s.latents is not None else None,
                                n,
                                2,
                                per_image,
                                s,
                                ref.media_kv[i][part],
                            )
                            for s, n in zip(sessions, rows)
                        ]
                    )
                    for part in (0, 1)
                )
                for i in ref.media_kv
            }  # 2 × (B, H, T*L, hd)
        return merged

    def trim_padding(self) -> int:
        """Drop the leading positions that every row masks (left by rows that have gone),
        and image slots that no row's ``<image>`` markers reach (all of them when no row has
        an image: the cross-attention blocks then do not run); returns how many positions
        were dropped."""
        if self.attention_mask is None or self.cache is None:
            return 0
        if self.latents is not None:
            needed = int((self.ids == self.model.image_token_id).sum(1).max())
            if needed == 0:
                self.latents, self.media_kv = None, {}
            elif needed < self.latents.shape[1]:
                per_image = self.latents.shape[2]
                self.latents = self.latents[:, :needed]
                self.media_kv = {
                    i: (k[:, :, : needed * per_image], v[:, :, : needed * per_image])
                    for i, (k, v) in self.media_kv.items()
                }
        real = self.attention_mask.bool().any(0)
        drop = int(real.long().argmax()) if bool(real.any()) else 0
        if drop == 0:
            return 0
        layers = _plain_cache_layers(self.cache)
        self.cache = _new_cache(
            self.model.lm.config, [(layer.keys[:, :, drop:], layer.values[:, :, drop:]) for layer in layers]
        )
        self.ids = self.ids[:, drop:]
        self.attention_mask = self.attention_mask[:, drop:]
        return drop

    def start_from(self, other: Session, length: int) -> None:
        """Begin this unfed session with the first ``length`` tokens ``other`` (one row) has
        fed, copying their LM cache instead of running them: a prompt prefix that many
        requests share (a system prompt) runs once. Both must hold images or both none (the
        cross-attention block runs, or not, on every token), and the prefix no ``<image>``:
        after one, hidden states depend on the images."""
        if self.ids is not None or other.ids is None or other.ids.shape[0] != 1 or not 0 < length <= other.length:
            raise ValueError("start_from takes an unfed session and a prefix of a fed one-row session")
        if (self.latents is None) != (other.latents is None) or self.cache is None or other.cache is None:
            raise ValueError("start_from takes cached sessions that both have images or both have none")
        if bool((other.ids[:, :length] == self.model.image_token_id).any()):
            raise ValueError("a shared prefix must come before the first image")
        self.cache = _cache_prefix(other.cache, length, self.model.lm.config)
        self.ids = other.ids[:, :length].clone()
        self.attention_mask = other.attention_mask[:, :length].clone()

    def prefix_copy(self, length: int, row: int = 0) -> Session:
        """A one-row copy of row ``row`` of this session that holds only the row's first
        ``length`` real tokens (padding left out; the LM cache cloned, the media shared):
        what :meth:`start_from` starts other sessions from."""
        if self.ids is None or not 0 <= row < self.ids.shape[0] or self.cache is None:
            raise ValueError("prefix_copy takes a fed, cached session and one of its rows")
        columns = self.attention_mask[row].nonzero()[:, 0]
        if not 0 < length <= len(columns):
            raise ValueError(f"row {row} holds {len(columns)} tokens, not {length}")
        columns = columns[:length]
        other = copy.copy(self)
        other.cache = _new_cache(
            self.model.lm.config,
            [
                (layer.keys[row : row + 1, :, columns], layer.values[row : row + 1, :, columns])
                for layer in _plain_cache_layers(self.cache)
            ],
        )
        other.ids = self.ids[row : row + 1, columns].clone()
        other.attention_mask = torch.ones_like(other.ids)
        if self.latents is not None and bool((self.ids[row] == self.model.image_token_id).any()):
            other.latents = self.latents[row : row + 1]
            other.media_kv = {i: (k[row : row + 1], v[row : row + 1]) for i, (k, v) in self.media_kv.items()}
        else:  # a row without images (the zero images of a mixed batch are not its own)
            other.latents, other.media_kv = None, {}
        return other


def _cache_prefix(cache, length: int, config) -> DynamicCache:
    """A new cache holding a copy of the first ``length`` positions of ``cache``."""
    return _new_cache(
        config, [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in _plain_cache_layers(cache)]
    )


def _plain_cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers when all hold every position (no sliding window, no quantisation):
    only those can be padded and cut along the sequence."""
    layers = list(cache.layers)
    odd = {type(layer).__name__ for layer in layers if type(layer) not in (DynamicLayer, GrowingLayer)}
    if odd:
        raise ValueError(f"rows of this LM's cache ({', '.join(sorted(odd))}) cannot be batched by padding")
    return layers


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in a buffer with room to grow.

    transformers' ``DynamicLayer`` concatenates at every step, copying the layer's whole
    cache to append one position; here a step writes its position in place, and ``keys`` /
    ``values`` are views of the buffer's first positions. A full buffer is copied into one
    a quarter larger (at least 64 positions more). Cropping (``rewind``) keeps the buffer,
    and the next tokens overwrite what was cut; anything that makes new tensors (reordering
    rows, a new cache from slices) starts a new buffer at its next update. Values and the
    attention over them are those of ``DynamicLayer``; with autograd recording, it
    concatenates as ``DynamicLayer`` does."""

    def __init__(self):
        super().__init__()
        self._buffers_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._buffers_kv = None
            return super().update(key_states, value_states, *args, **kwargs)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        need = old + key_states.shape[-2]
        buffers = self._buffers_kv
        if (
            buffers is None
            or need > buffers[0].shape[-2]
            or not (_views_of(self.keys, buffers[0], old) and _views_of(self.values, buffers[1], old))
        ):  # a new buffer, holding what the layer holds now
            capacity = need + max(64, need // 4)
            buffers = self._buffers_kv = tuple(
                _grown(now, old, new, capacity) for now, new in ((self.keys, key_states), (self.values, value_states))
            )
        buffers[0][:, :, old:need] = key_states
        buffers[1][:, :, old:need] = value_states
        self.keys, self.values = buffers[0][:, :, :need], buffers[1][:, :, :need]
        return self.keys, self.values


def _views_of(t: torch.Tensor, buffer: torch.Tensor, length: int) -> bool:
    """Whether ``t`` is exactly ``buffer[:, :, :length]``."""
    return (
        t.dim() == 4
        and t.data_ptr() == buffer.data_ptr()
        and t.shape == (*buffer.shape[:2], length, buffer.shape[3])
        and t.stride() == buffer.stride()
    )


def _grown(now: torch.Tensor, old: int, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """A buffer of ``capacity`` positions shaped like ``new`` (B, H, S, D), holding ``now``'s ``old``."""
    buffer = new.new_empty((new.shape[0], new.shape[1], capacity, new.shape[3]))
    if old:
        buffer[:, :, :old] = now
    return buffer


def _new_cache(config, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """An LM cache for ``config`` whose full-attention layers are :class:`GrowingLayer`,
    holding a copy of ``data`` (keys and values per layer) when given."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer, (keys, values) in zip(cache.layers, data or ()):
        layer.update(keys, values)
    return cache
