"""LLaVA's projector: `linear` (LLaVA-1) or `mlp{N}x_gelu` (LLaVA-1.5 uses mlp2x_gelu): one token
out per patch in.

`pixel_shuffle: f` first folds each f x f block of neighbouring patches into one token with f*f
times the channels (space-to-depth, as Idefics3, SmolVLM and nanoVLM do before their projector):
f*f times fewer image tokens for the LLM, no patch features dropped. A leading CLS token (an
encoder with `keep_cls: true`) has no neighbours; it stays one token, its features repeated f*f
times so that the same projector reads it.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from seechat.models.adapters.base import Adapter, square_grid

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class MLPAdapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, projector: str = "mlp2x_gelu", pixel_shuffle: int = 1):
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
        if not isinstance(pixel_shuffle, int) or pixel_shuffle < 1:
            raise ValueError(f"adapter.pixel_shuffle={pixel_shuffle!r}; valid: an integer >= 1 (1 = off)")
        self.pixel_shuffle = pixel_shuffle
        layers: list[nn.Module] = [nn.Linear(in_dim * pixel_shuffle**2, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)

    @property
    def needs_square_grid(self) -> bool:
        return self.pixel_shuffle > 1

    def _grid(self, n_patches: int) -> tuple[int, int]:
        """(side of the square patch grid, 1 if a CLS token leads else 0)."""
        grid = square_grid(n_patches)
        if grid is not None and grid[0] % self.pixel_shuffle == 0:
            return grid
        raise ValueError(
            f"adapter.pixel_shuffle={self.pixel_shuffle} needs a square patch grid whose side it divides "
            f"(optionally after one CLS token); the encoder gives {n_patches} tokens"
        )

    def num_tokens(self, n_patches: int) -> int:
        if self.pixel_shuffle == 1:
            return n_patches
        side, extra = self._grid(n_patches)
        return (side // self.pixel_shuffle) ** 2 + extra

    def shuffle(self, features: torch.Tensor) -> torch.Tensor:
        """[B, (CLS +) s*s, D] -> [B, (CLS +) (s/f)^2, f*f*D]; each output row holds an f x f block
        of patches in row-major order."""
        f = self.pixel_shuffle
        side, extra = self._grid(features.shape[1])
        b, _, d = features.shape
        grid = features[:, extra:].reshape(b, side // f, f, side // f, f, d)
        blocks = grid.permute(0, 1, 3, 2, 4, 5).reshape(b, (side // f) ** 2, f * f * d)
        if not extra:
            return blocks
        return torch.cat([features[:, :1].repeat(1, 1, f * f), blocks], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pixel_shuffle > 1:
            features = self.shuffle(features)
        return self.proj(features)
