"""The VisionEncoder contract: pixels in, per-patch features out.

Every backend (open_clip, transformers CLIP/SigLIP) wraps a vision tower and states what the
rest of seechat needs to know before any forward: the feature width, the number of patch tokens
it emits, the image transform that produces its input, and which layer it reads.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchvision import transforms as T


class VisionEncoder(nn.Module):
    """Base class. Subclasses set `tower` (the wrapped module whose parameters train or freeze),
    `hidden_size`, `image_size`, `grid` (patch rows, columns), `num_patches` (rows * columns, plus
    one when a kept CLS token leads) and implement `forward`."""

    tower: nn.Module
    hidden_size: int
    image_size: int
    grid: tuple[int, int]
    num_patches: int

    hidden_index: int  # index into the hidden states (0 = embeddings output), from feature_layer

    def __init__(self, feature_layer: int = -2, keep_cls: bool = False):
        super().__init__()
        self.feature_layer = feature_layer
        self.keep_cls = keep_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, N_patches, D]
        raise NotImplementedError

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> normalized tensor [3, H, W]; picklable so DataLoader workers can use it."""
        raise NotImplementedError

    def offline_config(self) -> dict:
        """Builder kwargs that rebuild this architecture (random init) without any download;
        used when a saved model carries the encoder's weights."""
        raise NotImplementedError

    def _check_layer(self, num_layers: int) -> int:
        """Map `feature_layer` to an index into the tower's hidden states, LLaVA's convention:
        `hidden_states[feature_layer]` where hidden_states[0] is the embeddings output (what the
        first block reads) and hidden_states[i] block i-1's output, so 1 is the first block,
        -1 the last and -2 the penultimate."""
        count = num_layers + 1
        index = self.feature_layer if self.feature_layer >= 0 else count + self.feature_layer
        if not 0 <= index < count:
            raise ValueError(
                f"encoder.feature_layer={self.feature_layer} is out of range for a tower with "
                f"{num_layers} layers (valid: {-count}..{num_layers}; 0 = the embeddings, -1 = the last block)"
            )
        return index


def clip_style_transform(image_size: int, mean: tuple, std: tuple) -> T.Compose:
    """Resize (bicubic) the short side, center-crop, normalise: the VQ tokenizer's and the tiny
    demo experts' transform (towers take theirs from their own processor config: transforms.py)."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.Lambda(_to_rgb),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _to_rgb(image):
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
