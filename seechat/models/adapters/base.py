"""The Adapter contract: vision features [B, N, D_vis] in, LLM-width embeddings
[B, num_tokens, D_llm] out, with `num_tokens(n_patches)` known before any forward so that
tokenisation can expand each `<image>` into exactly that many placeholders."""
from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    # True when the adapter reads the patches as a square grid (positions, neighbourhoods);
    # the model builder then rejects encoders with a rectangular grid.
    needs_square_grid: bool = False

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def num_tokens(self, n_patches: int) -> int:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
