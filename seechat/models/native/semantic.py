"""The semantic tokenizer's parts (`VQTokenizer` with `semantic_tokens` K > 0; vq.py): a frozen
pretrained vision tower whose mean feature becomes K FSQ vectors through one linear map, and its
training: the map first, on the tower's features computed once, against each attribute's class
through a small head that is then dropped (SEED's tokenizer at our scale)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class TowerSemantic(nn.Module):
    """A pretrained vision tower (frozen) -> the mean of its features -> `tokens` latent vectors
    of `dim` (before the FSQ), through one linear map: SEED's tokenizer (a pretrained ViT, then
    quantised) at our scale. Pixels come in the VQ's [-1, 1] and go to the tower as its own
    processor would give them (its mean and std, its size)."""

    def __init__(self, encoder: nn.Module, dim: int, tokens: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        processor = encoder.transform.processor()  # the tower's own pixels, whichever backend
        self.register_buffer("mean", torch.tensor(processor.image_mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).reshape(1, 3, 1, 1), persistent=False)
        self.proj = nn.Linear(encoder.hidden_size, dim * tokens)
        self.dim, self.tokens = dim, tokens

    def train(self, mode: bool = True) -> "TowerSemantic":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, ever
        return self

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> the tower's mean feature [B, hidden] (float32)."""
        size = self.encoder.image_size
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
        return self.encoder(((pixels + 1) / 2 - self.mean) / self.std).float().mean(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features [B, hidden] -> [B, dim, tokens, 1] (the FSQ's channel-first image layout)."""
        return self.proj(features).reshape(-1, self.tokens, self.dim).transpose(1, 2)[..., None]


def build_encoder(config: dict[str, Any]) -> nn.Module:
    from seechat.models.registry import build_encoder  # the registry imports every adapter: only when needed

    return build_encoder(config)


class _SemanticHead(nn.Module):
    """Training only: each attribute's class from its own semantic codes (their quantised
    vectors): semantic token k serves attribute k mod A, so a code stands for one attribute's
    value, as a caption word does ("blue", then "circle")."""

    def __init__(self, dim: int, tokens: int, classes: Sequence[int], hidden: int = 64):
        super().__init__()
        if tokens < len(classes):
            raise ValueError(f"semantic_tokens={tokens} must be at least the number of attributes ({len(classes)}): "
                             "each semantic token serves one attribute")
        self.attributes = len(classes)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim * len(range(a, tokens, len(classes))), hidden), nn.SiLU(), nn.Linear(hidden, n))
            for a, n in enumerate(classes))

    def loss(self, latent: torch.Tensor, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over attributes of the cross-entropy against each image's class (-100: unknown,
        ignored). latent [B, L, K, 1]; labels per attribute [B]."""
        total = latent.new_zeros(())
        for a, (mlp, target) in enumerate(zip(self.mlps, labels)):
            if (target >= 0).any():
                logits = mlp(latent[:, :, a :: self.attributes].flatten(1))
                total = total + F.cross_entropy(logits, target, ignore_index=-100)
        return total / self.attributes


def train_semantic(model: nn.Module, images: torch.Tensor, labels: Sequence[tuple[Sequence[str], torch.Tensor]],
                   epochs: int, batch_size: int, lr: float, seed: int) -> torch.Tensor:
    """A semantic `VQTokenizer`'s linear map, through the FSQ, on the frozen tower's features (computed
    once): cross-entropy of a small MLP head against each attribute's class. Returns the features."""
    head = _SemanticHead(len(model.config["levels"]), model.semantic_tokens, [len(a) for a, _ in labels])
    if not any(bool((t >= 0).any()) for _, t in labels):
        raise ValueError("the semantic codes need at least one image with a known class (every label is -100)")
    targets = [t.long() for _, t in labels]
    features = torch.cat([model.semantic.features(images[i : i + 256]) for i in range(0, len(images), 256)])
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([*model.semantic.proj.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    for epoch in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = head.loss(model.semantic_latent(features[index])[0], [t[index] for t in targets])
            if loss.requires_grad:  # a batch whose images know no class of any attribute has no loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        logger.info("vq semantic epoch %d: cross-entropy %.4f", epoch + 1, loss.item())
    return features
