"""Gated cross-attention dense blocks and the per-call media state they read.

Flamingo (Alayrac et al. 2022, sec. 2.2): before chosen frozen LM layers,
``x = x + tanh(a) * xattn(x, latents)`` then ``x = x + tanh(f) * ffw(x)``, with the
gates ``a = f = 0`` at init so the untrained model is exactly the LM. IDEFICS's block is
the same with RMS norms, a Llama MLP, optional per-head query/key norms and per-channel
gates (the keyword options of :class:`GatedCrossAttentionBlock`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def cross_attention_mask(
    media_index: torch.Tensor, num_images: int, num_latents: int, only_latest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which latents each text token may attend to.

    ``media_index`` (B, S) counts the ``<image>`` tokens at or before each position
    (0: no image yet). Returns ``allowed`` (B, 1, S, T*L) and ``has_media`` (B, S, 1).
    Rows without any image are allowed everything so that softmax stays finite; the
    block then zeroes their output exactly.
    """
    key_image = torch.arange(1, num_images + 1, device=media_index.device).repeat_interleave(num_latents)  # (T*L,)
    mi = media_index[:, :, None]  # (B, S, 1)
    allowed = (key_image == mi) if only_latest else (key_image <= mi)
    has_media = mi > 0
    return (allowed | ~has_media)[:, None], has_media


class VisitCounter:
    """How many cross-attention layers ran in a call. A plain object on purpose: wrappers
    such as FSDP copy dataclasses, lists and dicts in a call's arguments, not this."""

    def __init__(self) -> None:
        self.n = 0


@dataclass
class MediaState:
    """What the cross-attention layers need for one forward call.

    It travels with the call (as a keyword argument through the decoder), never on
    the model, so one model can serve many requests at once.
    """

    latents: torch.Tensor  # (B, T, L, D)
    media_index: torch.Tensor  # (B, S)
    only_latest: bool = True
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Per-layer cross-attention keys/values; a generation session fills it once."""
    visits: VisitCounter = field(default_factory=VisitCounter)
    _mask: tuple[torch.Tensor, torch.Tensor] | None = None
    _untouched: tuple[torch.Tensor | None] | None = None

    def rows_without_media(self) -> torch.Tensor | None:
        """(B, 1, 1), True for a sample with no image at all (``None`` when every sample has
        one): the blocks leave such a row untouched, as they do a batch without images, so a
        text-only request gives the same tokens alone or batched with image requests."""
        if self._untouched is None:
            none = self.media_index[:, -1] == 0  # the count at the last position is the sample's
            self._untouched = (none[:, None, None] if bool(none.any()) else None,)
        return self._untouched[0]

    def mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mask is None:
            _, images, latents, _ = self.latents.shape
            self._mask = cross_attention_mask(self.media_index, images, latents, self.only_latest)
        return self._mask


class SwiGLU(nn.Module):
    """A Llama MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class GatedCrossAttentionBlock(nn.Module):
    """Text ``(B, S, D)`` attends to image latents ``(B, T, L, D_media)``; both sub-blocks
    behind tanh gates. ``D_media`` is ``D`` unless the resampler keeps the vision width.
    The keyword options are :class:`~vlm.config.CrossAttnConfig`'s fields of the same names."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        ff_mult: int,
        media_dim: int | None = None,
        *,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        ff: str = "gelu",
        ff_dim: int | None = None,
        qk_norm: bool = False,
        vector_gates: bool = False,
    ):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        hidden = ff_dim or dim * ff_mult
        self.norm = _norm(norm, dim, norm_eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim or dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        if ff == "swiglu":
            self.ff = nn.Sequential(_norm(norm, dim, norm_eps), SwiGLU(dim, hidden))
        else:
            self.ff = nn.Sequential(
                _norm(norm, dim, norm_eps),
                nn.Linear(dim, hidden, bias=False),
                nn.GELU(),
                nn.Linear(hidden, dim, bias=False),
            )
        self.attn_gate = nn.Parameter(torch.zeros(dim if vector_gates else 1))
        self.ff_gate = nn.Parameter(torch.zeros(dim if vector_gates else 1))

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values over all latents: (B, T, L, D_media) → 2 × (B, H, T*L, hd)."""
        # A layer converted for inference names its input dtype (its .weight would be a copy).
        latents = latents.flatten(1, 2).to(getattr(self.to_kv, "input_dtype", None) or self.to_kv.weight.dtype)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_kv(latents).chunk(2, dim=-1))
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, media: MediaState, layer: int) -> torch.Tensor:
        kv = media.kv.get(layer)
        k, v = kv if kv is not None else self.media_kv(media.latents)
        allowed, has_media = media.mask()
        if media.latents.shape[1] == 1:
            allowed = None  # one image: every row with media sees all keys; skip the mask
        h = x.to(self.attn_gate.dtype)  # the block's dtype (its linears may store theirs otherwise)
        q = self.q_norm(self.to_q(self.norm(h)).unflatten(-1, (self.heads, -1)).transpose(1, 2))  # (B, H, S, hd)
        attn = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed)
        attn = self.to_out(attn.transpose(1, 2).flatten(2))  # (B, S, D)
        attn = torch.where(has_media, attn, torch.zeros((), dtype=attn.dtype, device=attn.device))
        h = h + torch.tanh(self.attn_gate) * attn
        h = h + torch.tanh(self.ff_gate) * self.ff(h)
        # Add only the update back in the LM's dtype, so zero gates leave x bit-identical.
        out = x + (h - x.to(h.dtype)).to(x.dtype) if h.dtype != x.dtype else h
        untouched = media.rows_without_media()
        return out if untouched is None else torch.where(untouched, x, out)
