"""The Adapter contract: vision features [B, N, D_vis] in, LLM-width embeddings
[B, num_tokens, D_llm] out, with `num_tokens(n_patches)` known before any forward so that
tokenisation can expand each `<image>` into exactly that many placeholders.

An adapter's size may follow the experts it joins: the keys in `follows_experts` may be left out
of a card (or set to `auto`) and `derive` fills them from an `Experts` description at build time,
taking the keys a recipe does set into account (an explicit width changes the derived heads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

AUTO = "auto"


@dataclass(frozen=True)
class Experts:
    """What an adapter's derived size may depend on: the vision features' width and patch grid
    (rows, columns, CLS excluded) and the LM's width and depth."""

    vision_width: int
    grid: tuple[int, int]
    llm_width: int
    llm_layers: int


def unset(cfg: dict[str, Any], key: str) -> bool:
    return cfg.get(key, AUTO) in (AUTO, None)


def divisor_at_most(width: int, heads: int) -> int:
    """The largest head count <= `heads` that divides `width` (attention needs equal heads)."""
    heads = max(1, min(heads, width))
    while width % heads:
        heads -= 1
    return heads


def square_grid(n_patches: int) -> tuple[int, int] | None:
    """(side, 1 if a CLS token leads else 0) when `n_patches` tokens are a square patch grid,
    optionally after one leading CLS token; None otherwise. A plain square wins (only n=1 is
    both a square and a square plus one)."""
    for extra in (0, 1):
        side = math.isqrt(max(n_patches - extra, 0))
        if side and side * side == n_patches - extra:
            return side, extra
    return None


class Adapter(nn.Module):
    # True when the adapter reads the patches as a square grid (positions, neighbourhoods);
    # the model builder then rejects encoders with a rectangular grid.
    needs_square_grid: bool = False
    # Constructor keys whose default follows the experts (see `derive`).
    follows_experts: tuple[str, ...] = ()

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    @classmethod
    def derive(cls, cfg: dict[str, Any], experts: Experts) -> dict[str, Any]:
        """`cfg` with every unset key of `follows_experts` filled for `experts`."""
        return dict(cfg)

    def num_tokens(self, n_patches: int) -> int:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
