"""Qwen-VL's position-aware vision-language adapter, implemented from the Qwen-VL paper
(Bai et al., 2023, sec. 2.1): a grid of learned queries (16x16 = 256 by default) compresses the
patch features with ONE multi-head cross-attention; 2-D absolute sin-cos position embeddings
are added to queries and keys so that the compression keeps track of where each patch was.

Key positions are the same closed form, evaluated where each patch lies on the query grid: a
side x side patch grid covering the image of a G x G query grid has its cell centres at
(i + 0.5) * G / side - 0.5 (e.g. 32x32 patches of a 448-px ViT-bigG against 16x16 queries), so
keys and queries at the same place of the image get the same angles. It is computed exactly
for any grid (what resizing a G x G table would only approximate) and never stored: saved
resampler files hold no position table. Values carry no position, only content.

Unset sizes follow the experts (`derive`): width = LM width, heads = width / 128, and a query
grid of min(16, patch grid side), since a resampler that emits more tokens than it reads
compresses nothing. On Qwen-VL's experts (Qwen-7B, 4096 wide; ViT-bigG/14 at 448 px, 32x32
patches, or at 224 px, 16x16) that is the paper's 256 queries, width 4096, 32 heads.

A CLS token leading the patches (an encoder with `keep_cls: true`) has no grid position: the
resampler drops it and reads the grid behind it; its output length stays grid_size^2.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seechat.models.adapters.base import Adapter, Experts, divisor_at_most, square_grid, unset

# Qwen-VL: 16x16 queries, 128-wide attention heads.
_QWEN_VL_GRID, _HEAD_DIM = 16, 128


def sincos_2d(dim: int, height: int, width: int, extent: tuple[int, int] | None = None) -> torch.Tensor:
    """2-D sin-cos position table [height*width, dim], row-major (index = y*width + x).

    The first dim/2 channels encode the row y, the last dim/2 the column x; each half is
    [sin(p*w_0..w_{k-1}), cos(p*w_0..w_{k-1})] with w_i = 10000^(-i/k), k = dim/4
    (the 1-D scheme of "Attention Is All You Need", once per axis). Positions are the cell
    indices (p = 0..height-1), or with `extent` = (rows, columns) of a reference grid, the cell
    centres of this grid measured in that one: p = (i + 0.5) * rows / height - 0.5."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    rows, cols = extent or (height, width)
    k = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)

    def coords(n: int, span: int) -> torch.Tensor:
        return (torch.arange(n, dtype=torch.float64) + 0.5) * (span / n) - 0.5

    ys, xs = torch.meshgrid(coords(height, rows), coords(width, cols), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(ys), axis(xs)], dim=1).float()


class ResamplerAdapter(Adapter):
    needs_square_grid = True
    follows_experts = ("grid_size", "embed_dim", "num_heads")

    @classmethod
    def derive(cls, cfg: dict[str, Any], experts: Experts) -> dict[str, Any]:
        out = dict(cfg)
        if unset(out, "grid_size"):
            out["grid_size"] = min(_QWEN_VL_GRID, *experts.grid)
        if unset(out, "embed_dim"):
            out["embed_dim"] = experts.llm_width
        if unset(out, "num_heads"):
            out["num_heads"] = divisor_at_most(out["embed_dim"], out["embed_dim"] // _HEAD_DIM)
        return out

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
        heads = num_heads or divisor_at_most(dim, dim // _HEAD_DIM)
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
        self._key_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    def num_tokens(self, n_patches: int) -> int:
        self._grid(n_patches)
        return self.grid_size * self.grid_size

    @staticmethod
    def _grid(n_patches: int) -> tuple[int, int]:
        """(side of the square patch grid, 1 if a CLS token leads it else 0)."""
        grid = square_grid(n_patches)
        if grid is None:
            raise ValueError(
                f"the resampler needs a square patch grid (optionally after one CLS token), "
                f"got {n_patches} patch tokens"
            )
        return grid

    def key_positions(self, side: int) -> torch.Tensor:
        """Sin-cos positions of a side x side patch grid on the query grid (exact, cached)."""
        if side == self.grid_size:
            return self.pos_embed
        device = self.pos_embed.device
        if (side, device) not in self._key_tables:
            table = sincos_2d(self.pos_embed.shape[1], side, side, extent=(self.grid_size, self.grid_size))
            self._key_tables[(side, device)] = table.to(device)
        return self._key_tables[(side, device)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        side, cls = self._grid(features.shape[1])
        kv = self.ln_kv(self.kv_proj(features[:, cls:]))
        pos_k = self.key_positions(side).to(kv.dtype)
        q = (self.ln_q(self.query) + self.pos_embed).to(kv.dtype)
        q = q.unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(q, kv + pos_k, kv, need_weights=False)
        return self.proj(self.ln_post(out))
