"""LLaVA's projector: `linear` (LLaVA-1) or `mlp{N}x_gelu` (LLaVA-1.5 uses mlp2x_gelu): one token
out per patch in."""
from __future__ import annotations

import re

import torch
from torch import nn

from .base import Adapter

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class MLPAdapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, projector: str = "mlp2x_gelu"):
        super().__init__(in_dim, out_dim)
        self.projector = projector
        if projector == "linear":
            depth = 1
        elif match := _MLP.match(projector):
            depth = int(match.group(1))
        else:
            raise ValueError(
                f"adapter.projector={projector!r}; valid: 'linear' or 'mlp<N>x_gelu' (e.g. mlp2x_gelu)"
            )
        if depth < 1:
            raise ValueError(f"adapter.projector={projector!r} needs at least one layer")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)

    def num_tokens(self, n_patches: int) -> int:
        return n_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)
