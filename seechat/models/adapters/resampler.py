"""Qwen-VL's position-aware vision-language adapter, implemented from the Qwen-VL paper
(Bai et al., 2023, sec. 2.1): a grid of learned queries (16x16 = 256 by default) compresses the
patch features with ONE multi-head cross-attention; 2-D absolute sin-cos position embeddings
are added to queries and keys so that the compression keeps track of where each patch was.

Key positions come from the same table as the query positions, bicubically resized when the
patch grid differs from the query grid (e.g. 32x32 patches of a 448-px ViT-bigG vs 16x16
queries). Values carry no position, only content.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seechat.models.adapters.base import Adapter


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """2-D sin-cos position table [height*width, dim], row-major (index = y*width + x).

    The first dim/2 channels encode the row y, the last dim/2 the column x; each half is
    [sin(p*w_0..w_{k-1}), cos(p*w_0..w_{k-1})] with w_i = 10000^(-i/k), k = dim/4
    (the 1-D scheme of "Attention Is All You Need", once per axis)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    k = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(ys), axis(xs)], dim=1).float()


class ResamplerAdapter(Adapter):
    needs_square_grid = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: int = 16,
        embed_dim: int | None = None,
        num_heads: int | None = None,
    ):
        super().__init__(in_dim, out_dim)
        dim = embed_dim or out_dim
        heads = num_heads or max(1, dim // 128)
        if dim % heads:
            raise ValueError(f"adapter.embed_dim={dim} is not divisible by num_heads={heads}")
        self.grid_size = grid_size
        self.query = nn.Parameter(torch.empty(grid_size * grid_size, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(in_dim, dim, bias=False) if in_dim != dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self.register_buffer("pos_embed", sincos_2d(dim, grid_size, grid_size), persistent=False)

    def num_tokens(self, n_patches: int) -> int:
        self._side(n_patches)
        return self.grid_size * self.grid_size

    @staticmethod
    def _side(n_patches: int) -> int:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(
                f"the resampler needs a square patch grid, got {n_patches} patches "
                "(set encoder.keep_cls: false so the CLS token is dropped)"
            )
        return side

    def key_positions(self, n_patches: int) -> torch.Tensor:
        side = self._side(n_patches)
        if side == self.grid_size:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(side * side, -1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(features))
        pos_k = self.key_positions(features.shape[1]).to(kv.dtype)
        q = (self.ln_q(self.query) + self.pos_embed).to(kv.dtype)
        q = q.unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(q, kv + pos_k, kv, need_weights=False)
        return self.proj(self.ln_post(out))
