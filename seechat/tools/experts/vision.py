"""A CLIP ViT pretrained on the data's own images, the way its real counterpart was, at toy scale.

* contrastive (CLIP's InfoNCE): each image against every caption of a head (the answers of one
  describing question), so images sharing a caption are not pushed apart; one softmax per head
* self-supervised, when no answer describes an image: SimCLR's two augmented views of each
  image, each view's partner the positive, the batch's other images the negatives

Random shifts (and flips, where the data allows them) stand in for the variety of a web-scale
image set: a ViT has no built-in translation invariance.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, SiglipVisionModel
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from seechat.data import load_image
from seechat.models.encoders.base import clip_style_transform
from seechat.precision import cpu_autocast

logger = logging.getLogger(__name__)

TOWERS = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
Heads = Sequence[tuple[Sequence[str], Sequence[int]]]  # per head: captions, each image's caption index


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 6, flip: bool = True) -> torch.Tensor:
    """Per image: a shift of up to `shift` pixels (edges replicated) and, with `flip`, a random
    horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    if not flip:
        return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flips = torch.randint(0, 2, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return torch.where(torch.tensor(flips, dtype=torch.bool)[:, None, None, None], out.flip(3), out)


class BagOfWordsText(nn.Module):
    """The text tower of the contrastive pretraining: mean of word embeddings + projection."""

    def __init__(self, vocab: list[str], dim: int):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab), dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        rows = [self.embed(torch.tensor([self.vocab[w] for w in c.split()])).mean(0) for c in captions]
        return self.proj(torch.stack(rows))


def caption_vocab(heads: Heads) -> list[str]:
    """The words of every caption, in order of first appearance."""
    return list(dict.fromkeys(w for captions, _ in heads for c in captions for w in c.split()))


def pooled(out) -> torch.Tensor:
    """The tower's image embedding: its pooled output (CLIP's CLS, SigLIP's attention-pooling
    head) or, for a tower without one (SigLIP with `vision_use_head: false`), the mean of its
    last (post-layernormed) patch tokens."""
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)


def _head_loss(emb, heads, text, logit_scale, idx):
    loss = 0.0
    for captions, target in heads:
        target = target[idx]
        txt = F.normalize(text(captions), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * emb @ txt.T
        if (target >= 0).any():
            loss = loss + F.cross_entropy(logits.float(), target, ignore_index=-100)
    return loss


def _view_loss(tower, proj, batch, generator, shift, flip, logit_scale):
    """SimCLR's NT-Xent over two augmented views of each image in `batch`."""
    views = torch.cat([augment(batch, generator, shift, flip), augment(batch, generator, shift, flip)])
    z = F.normalize(proj(pooled(tower(pixel_values=views))), dim=-1).float()
    n = batch.shape[0]
    sim = logit_scale.exp().clamp(max=100) * z @ z.T
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, partner)


def load_pixels(images: Sequence[str], image_root: str | Path | None, transform) -> torch.Tensor:
    return torch.stack([transform(load_image(p, image_root, p).convert("RGB")) for p in images])


def build_vision(
    images: Sequence[str],
    image_root: str | Path | None,
    heads: Heads,
    out: Path,
    image_size: int,
    vocab: list[str] | None = None,
    epochs: int = 8,
    batch_size: int = 64,
    hidden_size: int = 128,
    layers: int = 4,
    patch_size: int = 16,
    lr: float = 1e-3,
    augment_shift: int | None = 6,
    flip: bool = True,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    config: PretrainedConfig | None = None,
) -> CLIPVisionModel | SiglipVisionModel:
    """Pretrain and save (`save_pretrained` + its image processor) a vision tower on `images`:
    a CLIP ViT of the given sizes, or the tower `config` describes (a CLIP or SigLIP vision
    config; it then decides the sizes). `heads` empty: self-supervised. `augment_shift` None: no
    augmentation (contrastive only). `dtype`: autocast dtype (None: fp32)."""
    torch.manual_seed(seed)
    if config is None:
        config = CLIPVisionConfig(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
            intermediate_size=hidden_size * 4, num_hidden_layers=layers,
            num_attention_heads=max(1, hidden_size // 32), projection_dim=hidden_size,
        )
        config._attn_implementation = "eager"  # faster than SDPA for tiny models on CPU
    tower = TOWERS[config.model_type](config)
    hidden_size, image_size = config.hidden_size, config.image_size
    visual_proj = nn.Linear(hidden_size, hidden_size, bias=False)
    text = BagOfWordsText(vocab if vocab is not None else caption_vocab(heads) or ["-"], hidden_size)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    images = list(images)
    transform = clip_style_transform(image_size, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
    pixels = load_pixels(images, image_root, transform)
    targets = [(list(c), torch.tensor(list(t))) for c, t in heads]
    objective = "contrastive" if targets else "self-supervised"
    logger.info("vision pretraining (%s) on %d images, %d head(s)", objective, len(images), len(targets))
    if not targets and augment_shift is None:
        raise ValueError("self-supervised pretraining needs augmentation (augment_shift)")

    params = [*tower.parameters(), *visual_proj.parameters(), *text.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(total=steps, desc="vision", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            with cpu_autocast(dtype):
                if targets:
                    batch = augment(pixels[idx], generator, augment_shift, flip) if augment_shift is not None else pixels[idx]
                    emb = F.normalize(visual_proj(pooled(tower(pixel_values=batch))), dim=-1)
                    loss = _head_loss(emb, targets, text, logit_scale, idx)
                else:
                    loss = _view_loss(tower, visual_proj, pixels[idx], generator, augment_shift, flip, logit_scale)
            if isinstance(loss, torch.Tensor):
                loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            value = loss.item() if isinstance(loss, torch.Tensor) else loss
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        logger.info("vision epoch %d: loss %.4f", epoch + 1, value)
    bar.close()
    elapsed = time.time() - start
    logger.info("vision pretraining: %.0fs, %.0f images/s", elapsed, epochs * len(images) / max(elapsed, 1e-9))
    tower.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    ).save_pretrained(out)
    return tower
