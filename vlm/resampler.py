"""Perceiver resampler (Flamingo, Alayrac et al. 2022, sec. 2.1 / fig. 5).

Each image's variable number of spatial tokens is squeezed into a fixed set of
learned latents. Unlike OpenFlamingo, which runs its perceiver at the vision width,
we project to a (usually smaller) working width first: the resampler's cost then
does not grow with the vision tower. ``project=False`` (and ``media_time=False``) is
OpenFlamingo's resampler, for its converted checkpoints (``vlm/convert.py``);
``ff_act="relu"`` and ``qk_norm`` make it IDEFICS's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int, act: str = "gelu") -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.ReLU() if act == "relu" else nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


def sincos_2d(n_tokens: int, dim: int) -> torch.Tensor:
    """Fixed position codes ``(N, dim)`` for a square grid of ``N`` tokens in
    row-major order: the first half of the channels encodes the row, the second
    half the column, each as sines and cosines over geometric frequencies."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"spatial_pos needs a square grid of image tokens, got {n_tokens} tokens")
    if dim % 4:
        raise ValueError(f"spatial_pos needs a resampler width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(side, dtype=torch.float32)[:, None] * freqs  # (side, quarter)
    axis = torch.cat([coords.sin(), coords.cos()], dim=1)  # (side, dim/2)
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(n_tokens, dim)


class PerceiverAttention(nn.Module):
    """Latents attend to the image tokens concatenated with themselves."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (M, N, D) image tokens; latents: (M, L, D), M = batch * images
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (M, H, *, hd)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    """Image tokens ``(B, T, N, Dv)`` → latents ``(B, T, L, D_lm)`` (``L + N`` with ``pass_tokens``;
    ``Dv`` wide without ``project``)."""

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        dim: int,
        num_latents: int,
        depth: int,
        heads: int,
        head_dim: int,
        ff_mult: int,
        max_images: int,
        spatial_pos: bool = False,
        pass_tokens: bool = False,
        project: bool = True,
        media_time: bool = True,
        ff_act: str = "gelu",
        qk_norm: bool = False,
    ):
        super().__init__()
        if not project and dim != vision_dim:
            raise ValueError(f"without projections the resampler works at the vision width {vision_dim}, not {dim}")
        self.max_images = max_images
        self.spatial_pos = spatial_pos
        self.pass_tokens = pass_tokens
        self.proj_in = nn.Linear(vision_dim, dim) if project else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        # Media-time embeddings: where an image sits among a sample's images.
        self.media_time = nn.Parameter(torch.randn(max_images, 1, dim) * 0.02) if media_time else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim, qk_norm), feed_forward(dim, ff_mult, ff_act)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, lm_dim) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        x = self.proj_in(x)  # (B, T, N, D)
        if self.media_time is not None:
            if t > self.max_images:
                raise ValueError(
                    f"{t} images per sample, but the resampler has {self.max_images} media-time embeddings"
                )
            x = x + self.media_time[:t]
        if self.spatial_pos:
            x = x + sincos_2d(x.shape[2], x.shape[3]).to(x.device, x.dtype)
        x = x.flatten(0, 1)  # (B*T, N, D)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B*T, L, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        if self.pass_tokens:  # the decoder also sees every image token, after the latents
            latents = torch.cat([latents, x], dim=1)  # (B*T, L + N, D)
        out = self.proj_out(self.norm(latents))  # (B*T, L, D_lm), or L + N
        return out.unflatten(0, (b, t))
