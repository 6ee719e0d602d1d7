"""The native path's image tokenizer: a small VQ-VAE (conv encoder -> FSQ -> conv decoder).

Chameleon turns a 512x512 image into 1,024 discrete codes of an 8,192-entry codebook; at our
scale a 64x64 image becomes an 8x8 grid of codes (three stride-2 convolutions) of a
prod(levels)-entry codebook. The quantiser is finite scalar quantisation (FSQ, Mentzer et al.
2023) from `vector-quantize-pytorch`: each latent channel is rounded to a few levels, so there
is no codebook to collapse and no commitment loss; training is plain reconstruction MSE.

    vq = train_vq(images)                     # [N, 3, H, W] in [-1, 1]
    codes = vq.encode(pixels)                 # [B, num_codes] ints in [0, codebook_size)
    pixels = vq.decode(codes)                 # [B, 3, H, W]
    vq.save_pretrained(dir); VQTokenizer.from_pretrained(dir)   # vq.json + vq.safetensors

Pixels are normalised to [-1, 1] (`transform` does it for PIL images, `to_pil` undoes it).

A *semantic* tokenizer (`semantic_tokens` K > 0; SEED's idea at our scale) puts K more codes
before the grid, read off a pretrained vision tower (the stitched paths'; frozen, copied into
the VQ): the mean of its features, one linear map to K vectors, the same FSQ, trained first
(`train_vq` with `labels`; semantic.py) on the corpus' describing answers (on easy-VQA colour
and shape), then the grid as without it. Semantic token k stands for attribute k mod A (colour, then shape: a
caption's words) and has its own id range after the grid's (`codebook_size` is (K + 1) times the
grid's). The decoder reads only the grid: an image is K + 64 codes, what it shows at the front.
With `semantic_decoder: true` it reads the semantic codes' vectors too (beside every grid cell),
and trains on grids partly replaced by other images' codes (`train_vq`'s `grid_noise`), so that
what the codes say (a circle, blue) survives a grid that the native LM draws less coherently than
an encoder would: SEED decodes its semantic codes alone (a diffusion model); here they guide the grid.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from vector_quantize_pytorch import FSQ

from seechat.models.encoders.base import clip_style_transform
from seechat.models.native.semantic import TowerSemantic, build_encoder, train_semantic
from seechat.precision import cpu_autocast

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "vq.json", "vq.safetensors"
WORDS_FILE = "code_words.json"  # optional: what each code co-occurs with (see `code_word_weights`)
HALF = (0.5, 0.5, 0.5)  # mean and std that map [0, 1] pixels to [-1, 1]


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _widths(channels: int, downsample: int) -> list[int]:
    """Channel width after each stride-2 stage: `channels` at half resolution, twice that below."""
    return [channels] + [channels * 2] * (downsample - 1)


class VQTokenizer(nn.Module):
    """Conv encoder -> FSQ -> conv decoder. `downsample` stride-2 stages: an `image_size`
    image becomes a (image_size / 2**downsample)^2 grid of codes. No convolution runs at full
    resolution with more than 3 channels (the first conv strides, the last one upsamples to
    RGB directly): those layers would cost most of the compute for no gain on flat shapes.
    `semantic_tokens` > 0: that many semantic codes before the grid, read off the vision tower
    `semantic_encoder` describes (its `offline_config()`; module docstring)."""

    def __init__(self, image_size: int = 64, channels: int = 32, downsample: int = 3,
                 levels: Sequence[int] = (8, 5, 5, 5), semantic_tokens: int = 0,
                 semantic_encoder: dict[str, Any] | None = None, semantic_decoder: bool = False):
        super().__init__()
        if downsample < 1 or image_size % 2**downsample:
            raise ValueError(f"image_size={image_size} must be divisible by 2**downsample (downsample={downsample} >= 1)")
        if semantic_tokens < 0:
            raise ValueError(f"semantic_tokens={semantic_tokens} must be >= 0")
        if bool(semantic_tokens) != bool(semantic_encoder):
            raise ValueError(f"semantic_tokens={semantic_tokens} needs a semantic_encoder (a vision tower) "
                             "and a semantic_encoder needs semantic_tokens > 0")
        self.config = {"image_size": image_size, "channels": channels, "downsample": downsample,
                       "levels": list(levels)}
        if semantic_decoder and not semantic_tokens:
            raise ValueError("semantic_decoder: true needs semantic_tokens > 0 (the codes it reads)")
        if semantic_tokens:  # absent from older configs: they load as before
            self.config.update(semantic_tokens=semantic_tokens, semantic_encoder=semantic_encoder)
        if semantic_decoder:
            self.config["semantic_decoder"] = True
        self.code_words: dict[str, Any] | None = None  # {"words": [...], "weights": [codebook][words]}
        widths = _widths(channels, downsample)
        enc: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1)]
        for i in range(1, downsample):
            enc += [nn.SiLU(), nn.Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1)]
        enc += [_ResBlock(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], len(levels), 1)]
        self.enc = nn.Sequential(*enc)
        self.quantizer = FSQ(levels=list(levels))
        reads = len(levels) * (1 + semantic_tokens if semantic_decoder else 1)  # grid (+ semantic) vectors
        dec: list[nn.Module] = [nn.Conv2d(reads, widths[-1], 3, padding=1), _ResBlock(widths[-1])]
        for i in reversed(range(1, downsample)):
            dec += [nn.SiLU(), nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1)]
        dec += [nn.SiLU(), nn.ConvTranspose2d(widths[0], 3, 4, stride=2, padding=1)]
        self.dec = nn.Sequential(*dec)
        # made last: the grid's weights start (and, with their own loss, train) as without it
        self.semantic = (TowerSemantic(build_encoder(semantic_encoder), len(levels), semantic_tokens)
                         if semantic_tokens else None)

    # ------------------------------------------------------------------ what the rest needs
    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // 2 ** self.config["downsample"]
        return side, side

    @property
    def semantic_tokens(self) -> int:
        return self.config.get("semantic_tokens", 0)

    @property
    def num_codes(self) -> int:
        """Codes per image (the native LM's image tokens, boundary tokens not counted)."""
        return self.semantic_tokens + self.grid[0] * self.grid[1]

    @property
    def grid_codebook_size(self) -> int:
        return math.prod(self.config["levels"])

    @property
    def codebook_size(self) -> int:
        """Code ids: the grid's, then (semantic tokenizer) as many again for each semantic token."""
        return self.grid_codebook_size * (1 + self.semantic_tokens)

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> [3, S, S] in [-1, 1] (picklable, for DataLoader workers)."""
        return clip_style_transform(self.image_size, HALF, HALF)

    # ------------------------------------------------------------------ encode / decode
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction [B, 3, H, W] and grid codes [B, h, w] (straight-through for training)."""
        quantized, codes = self.quantizer(self.enc(pixels).float())
        semantic = self.semantic_latent(self.semantic.features(pixels))[0] if self.config.get("semantic_decoder") else None
        return self.decode_latent(quantized, semantic), codes

    def decode_latent(self, grid: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """Grid vectors [B, L, h, w] (and, with `semantic_decoder`, the semantic ones [B, L, K, 1])
        -> pixels [B, 3, H, W]."""
        if self.config.get("semantic_decoder"):
            grid = torch.cat([grid, semantic.flatten(1)[:, :, None, None].expand(-1, -1, *grid.shape[-2:])], 1)
        return self.dec(grid)

    def semantic_latent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantic tokenizer, from the tower's features (`semantic.features(pixels)`): quantised
        vectors [B, len(levels), K, 1] and codes [B, K, 1]."""
        return self.quantizer(self.semantic(features).float())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> codes [B, num_codes] (row-major over the grid), int64."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"VQ tokenizer expects [B, 3, {self.image_size}, {self.image_size}] pixels, "
                             f"got {tuple(pixels.shape)}")
        with torch.autocast(pixels.device.type, enabled=False):
            _, codes = self.quantizer(self.enc(pixels.float()))
            codes = codes.reshape(pixels.shape[0], -1).long()
            if self.semantic is not None:  # their own id range, in front of the grid
                _, semantic = self.semantic_latent(self.semantic.features(pixels.float()))
                ranges = torch.arange(1, self.semantic_tokens + 1, device=codes.device) * self.grid_codebook_size
                codes = torch.cat([semantic.reshape(pixels.shape[0], -1).long() + ranges, codes], 1)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, num_codes] -> pixels [B, 3, S, S] in [-1, 1] (clamped). The decoder reads the
        grid; a semantic-range id drawn in a grid slot reads as the grid code of the same vector."""
        if codes.ndim != 2 or codes.shape[1] != self.num_codes:
            raise ValueError(f"VQ tokenizer decodes [B, {self.num_codes}] codes, got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got {int(codes.min())}..{int(codes.max())}")
        h, w = self.grid
        grid = codes[:, self.semantic_tokens :] % self.grid_codebook_size
        with torch.autocast(codes.device.type, enabled=False):
            latent = self.quantizer.indices_to_codes(grid.reshape(-1, h, w).int())
            vectors = None
            if self.config.get("semantic_decoder"):  # [B, K, 1]: the semantic codes as encoded
                semantic = codes[:, : self.semantic_tokens, None] % self.grid_codebook_size
                vectors = self.quantizer.indices_to_codes(semantic.int())
            return self.decode_latent(latent, vectors).clamp(-1, 1)

    def code_vectors(self) -> torch.Tensor:
        """[codebook_size, len(levels)]: each code's quantised latent (each semantic range repeats
        the grid's vectors)."""
        return self.quantizer.indices_to_codes(torch.arange(self.codebook_size) % self.grid_codebook_size).float()

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, out / WEIGHTS_FILE)
        if self.code_words is not None:
            (out / WORDS_FILE).write_text(json.dumps(self.code_words) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VQTokenizer":
        root = Path(directory)
        if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{root} is not a saved VQ tokenizer: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        config = json.loads((root / CONFIG_FILE).read_text())
        if config.get("semantic_tokens") and not config.get("semantic_encoder"):
            raise ValueError(f"{root} was made with the removed CNN semantic encoder; remake it with "
                             "`python -m seechat.experiments.native_prepare --semantic-tower DIR`")
        model = cls(**config)
        model.load_state_dict(load_file(root / WEIGHTS_FILE))
        if (root / WORDS_FILE).is_file():
            model.code_words = json.loads((root / WORDS_FILE).read_text())
        return model.eval()


@torch.no_grad()
def code_word_weights(model: VQTokenizer, images: torch.Tensor, labels: Sequence[tuple[Sequence[str], torch.Tensor]],
                      batch_size: int = 256) -> dict[str, Any]:
    """What each code means in words: per attribute (its answers, each image's class or -100), the
    share of each answer among the images the code occurs in; the attributes are weighted by what
    the code tells about each (its information gain, log(answers) - entropy of the shares: a code
    that occurs with every shape but one colour stands for the colour), equally where it tells
    nothing (a code never seen with a known class gets no weight there); a semantic token's codes
    stand for the attribute the token serves (k mod the attribute count, as `train_vq`). Returns
    `{"words": [answer, ...], "weights": [codebook_size][len(words)]}`, each row summing to 1 or 0."""
    codes = torch.cat([model.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    parts, words = [], []
    for answers, target in labels:
        known = target >= 0
        counts = torch.zeros(model.codebook_size, len(answers))
        rows = codes[known]  # [n, num_codes]
        counts.index_put_((rows.flatten(), target[known].repeat_interleave(rows.shape[1])),
                          torch.ones(rows.numel()), accumulate=True)
        parts.append(counts / counts.sum(1, keepdim=True).clamp_min(1))
        words += list(answers)
    seen = torch.stack([(p.sum(1) > 0).float() for p in parts], 1)  # [codes, attributes]
    gain = torch.stack([math.log(p.shape[1]) + (p * p.clamp_min(1e-12).log()).sum(1) for p in parts], 1) * seen
    share = torch.where(gain.sum(1, keepdim=True) > 1e-6, gain, seen)
    share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
    grid = model.grid_codebook_size
    for k in range(model.semantic_tokens):  # a semantic token stands for its own attribute only
        share[grid * (k + 1) : grid * (k + 2)] = F.one_hot(torch.tensor(k % len(parts)), len(parts)).float()
    weights = torch.cat([p * share[:, a : a + 1] for a, p in enumerate(parts)], 1)
    return {"words": words, "weights": [[round(v, 4) for v in row] for row in weights.tolist()]}


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def load_pixels(paths: Sequence[str | Path], image_size: int) -> torch.Tensor:
    """Images at `paths` as one [N, 3, S, S] tensor in [-1, 1]."""
    transform = clip_style_transform(image_size, HALF, HALF)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def train_vq(images: torch.Tensor, epochs: int = 4, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
             dtype: torch.dtype | None = None, max_seconds: float | None = None,
             labels: Sequence[tuple[Sequence[str], torch.Tensor]] = (), tower: nn.Module | None = None,
             grid_noise: float = 0.5, **config: Any) -> VQTokenizer:
    """Train a `VQTokenizer(**config)` on `images` ([N, 3, S, S] in [-1, 1]) with MSE; random
    horizontal flips. `dtype`: CPU autocast dtype (None: fp32). The grid stops early at `max_seconds`.
    A semantic tokenizer (`semantic_tokens` > 0) needs a pretrained vision `tower` (a seechat
    `VisionEncoder`, copied in and frozen) and `labels`: per attribute, its answers and each
    image's class among them (-100: unknown; as `code_word_weights`). Its linear map and the
    FSQ learn them first, `epochs` passes over the tower's features through a small MLP (trained
    here, then dropped) by cross-entropy; then the grid trains as without it. A `semantic_decoder`
    reads the semantic codes as well; a `grid_noise` share of each batch then has a random share of
    its grid cells replaced by another image's (module docstring)."""
    semantic = config.get("semantic_tokens", 0)
    if bool(semantic) != bool(labels) or bool(semantic) != (tower is not None):
        raise ValueError(f"semantic_tokens={semantic} needs labels and a tower, and they need semantic_tokens > 0 "
                         f"(got {len(labels)} attributes, {'a' if tower is not None else 'no'} tower)")
    torch.manual_seed(seed)
    model = VQTokenizer(image_size=images.shape[-1], semantic_encoder=tower.offline_config() if semantic else None,
                        **config)
    semantic_vectors = None
    if semantic:
        model.semantic.encoder.load_state_dict(tower.state_dict())
        features = train_semantic(model, images, labels, epochs, batch_size, lr, seed)
        if model.config.get("semantic_decoder"):  # fixed from here on (flips change neither colour nor shape)
            with torch.no_grad():
                semantic_vectors = model.semantic_latent(features)[0]
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("semantic.")], lr=lr,
                            weight_decay=0.0)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    start, step = time.time(), 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            index = order[i : i + batch_size]
            batch = images[index]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            with cpu_autocast(dtype):
                if semantic_vectors is None:
                    recon, _ = model(batch)
                else:
                    grid, _ = model.quantizer(model.enc(batch).float())
                    recon = model.decode_latent(_mix_grid(grid, grid_noise, generator), semantic_vectors[index])
            loss = F.mse_loss(recon.float(), batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if max_seconds and time.time() - start > max_seconds:
                break
        logger.info("vq epoch %d: mse %.4f (%.0fs)", epoch + 1, loss.item(), time.time() - start)
        if max_seconds and time.time() - start > max_seconds:
            logger.info("vq: stopped at the %.0fs budget after %d/%d steps", max_seconds, step, steps)
            break
    return model.eval()


def _mix_grid(grid: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """`grid` [B, L, h, w] with, in a `share` of its images, a random fraction (uniform in [0, 1])
    of the cells taken from another image of the batch (same cell)."""
    b, _, h, w = grid.shape
    rate = torch.rand(b, generator=generator) * (torch.rand(b, generator=generator) < share)
    mixed = torch.rand(b, 1, h, w, generator=generator) < rate[:, None, None, None]
    other = grid[torch.roll(torch.arange(b), 1)]
    return torch.where(mixed.to(grid.device), other, grid)


@torch.no_grad()
def vq_metrics(model: VQTokenizer, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Reconstruction error and codebook usage on `images` ([N, 3, S, S] in [-1, 1]):
    MSE and PSNR on [0, 1] pixels, the same for the mean-image baseline, the fraction of codes
    used and the perplexity of code usage (exp of its entropy; codebook_size at most)."""
    model.eval()
    sq_err, counts = 0.0, torch.zeros(model.codebook_size)
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        codes = model.encode(batch)
        sq_err += F.mse_loss(model.decode(codes), batch, reduction="sum").item()
        counts += torch.bincount(codes.flatten(), minlength=model.codebook_size).float()
    mse = sq_err / images.numel() / 4  # [-1, 1] -> [0, 1]: errors halve, squares quarter
    baseline = F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images).item() / 4
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "mean_image_mse": baseline,
        "mean_image_psnr": 10 * math.log10(1 / max(baseline, 1e-12)),
        "codebook_size": model.codebook_size,
        "codes_per_image": model.num_codes,
        "codebook_usage": float((counts > 0).float().mean()),
        "perplexity": math.exp(entropy),
        "images": len(images),
    }
