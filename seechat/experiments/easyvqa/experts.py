"""Tiny experts for the embedded default, made from easy-VQA's TRAINING split only.

Nothing pretrained can be downloaded, so each expert is first trained the way its real
counterpart was, at toy scale:
  tokenizer  byte-level BPE on the training questions and answers, ChatML template
  vision     a SigLIP-architecture ViT (no CLS token) trained with CLIP's contrastive (InfoNCE)
             loss through its attention-pooling head against captions made
             from the training answers ("red shape", "circle"); each image is scored against
             every distinct caption, so images sharing a caption are not pushed apart; random
             flips and shifts stand in for the variety of a web-scale image set
  llm        a Qwen2-architecture chat LM trained on the training questions with each image
             replaced by its caption words ("blue circle\nis there a red shape?" -> "no"): it
             learns the task's reasoning over text, as a real LLM brings it
The experts are saved with `save_pretrained`, and the recipes load them by path exactly as they
would load `openai/clip-vit-large-patch14-336` or `lmsys/vicuna-7b-v1.5`.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from seechat.models.encoders.base import clip_style_transform
from seechat.precision import autocast_dtype, cpu_autocast, resolve_mixed_precision
from seechat.experiments.tiny import tiny_llm_config, train_tokenizer

logger = logging.getLogger(__name__)

# Bump when the way experts are made changes, so that runs/demo/experts made by an older
# version are rebuilt instead of reused (2: the LM's init std 0.02 -> 0.1; 3: the vision tower is
# SigLIP-shaped with 16-px patches, was CLIP with 8-px patches).
EXPERTS_VERSION = 3

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
IMAGE_SIZE = 64


def qa_pairs(samples: list[dict]) -> list[tuple[str, str, str]]:
    """(image, question, answer) for every turn pair of LLaVA-format samples."""
    out = []
    for s in samples:
        turns = s["conversations"]
        for q, a in zip(turns[0::2], turns[1::2]):
            out.append((s["image"], q["value"].replace("<image>", "").strip(), a["value"]))
    return out


def image_attributes(pairs: list[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """Color and shape of each training image, read off its training answers: directly from
    'what color/shape' answers, or by elimination from yes/no answers."""
    present: dict[str, dict[str, set]] = defaultdict(lambda: {"color": set(), "shape": set()})
    absent: dict[str, dict[str, set]] = defaultdict(lambda: {"color": set(), "shape": set()})
    for image, question, answer in pairs:
        words = question.rstrip("?").split()
        if answer in COLORS:
            present[image]["color"].add(answer)
        elif answer in SHAPES:
            present[image]["shape"].add(answer)
        elif answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            for kind, vocab in (("color", COLORS), ("shape", SHAPES)):
                for word in vocab:
                    if word in words:
                        seen = present if (answer == "yes") != negated else absent
                        seen[image][kind].add(word)
    attributes: dict[str, dict[str, str]] = {}
    for image in set(present) | set(absent):
        known = {}
        for kind, vocab in (("color", COLORS), ("shape", SHAPES)):
            candidates = present[image][kind] or (set(vocab) - absent[image][kind])
            if len(candidates) == 1:
                known[kind] = next(iter(candidates))
        attributes[image] = known
    return attributes


def build_tokenizer(pairs: list[tuple[str, str, str]], out: Path, vocab_size: int = 400):
    # The role names are in the corpus too, so that the chat template's "user"/"assistant" are
    # single tokens rather than spelled out letter by letter.
    texts = [q for _, q, _ in pairs] + [a for _, _, a in pairs] + ["user\n", "assistant\n"] * 1000
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, template="chatml")
    tokenizer.save_pretrained(out)
    split = sorted(a for a in {a for _, _, a in pairs} if len(tokenizer(a, add_special_tokens=False)["input_ids"]) > 1)
    logger.info("tokenizer: %d tokens; answers that take more than one token: %s", len(tokenizer), split or "none")
    return tokenizer


def _augment(images: torch.Tensor, generator: torch.Generator, shift: int = 6) -> torch.Tensor:
    """Per image: a random horizontal flip and a shift of up to `shift` pixels (edges
    replicated). Color and shape survive both (triangles stay upright, as in the data); the
    ViT, which has no built-in translation invariance, sees 3,800 images in many positions."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    flip = torch.randint(0, 2, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return torch.where(torch.tensor(flip, dtype=torch.bool)[:, None, None, None], out.flip(3), out)


class _BagOfWordsText(nn.Module):
    """The text tower of the contrastive pretraining: mean of word embeddings + projection."""

    def __init__(self, vocab: list[str], dim: int):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab), dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, captions: list[str]) -> torch.Tensor:
        rows = [self.embed(torch.tensor([self.vocab[w] for w in c.split()])).mean(0) for c in captions]
        return self.proj(torch.stack(rows))


def vision_config(hidden_size: int = 128, layers: int = 4, patch_size: int = 16) -> SiglipVisionConfig:
    """The demo tower's shape (32-wide heads)."""
    config = SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=patch_size, hidden_size=hidden_size,
        intermediate_size=hidden_size * 4, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
    )
    config._attn_implementation = "eager"  # faster than SDPA for tiny models on CPU
    return config


def llm_config(vocab_size: int, hidden_size: int = 192, layers: int = 4, heads: int = 3, init_std: float = 0.1):
    """The demo LM's shape: Qwen2, 64-wide heads (vLLM's CPU attention refuses 16)."""
    config = tiny_llm_config("qwen2", vocab_size, hidden_size=hidden_size, layers=layers, heads=heads)
    # HF's default init (std 0.02) suits widths in the thousands. At width 192 it leaves the
    # attention logits near zero, and the LM never learns to compare the question's word with
    # the caption's: yes/no stayed at chance after 4 epochs (val, text only). With std 0.1
    # (about 1.4/sqrt(width)) one epoch reaches 97-99%.
    config.initializer_range = init_std
    return config


def build_vision(
    train_samples: list[dict],
    image_root: Path,
    attributes: dict[str, dict[str, str]],
    out: Path,
    epochs: int = 8,
    batch_size: int = 64,
    hidden_size: int = 128,
    layers: int = 4,
    # 16 px on 64 px images: a 4x4 grid, 16 image tokens, about what pixel_shuffle: 2 gave on
    # 8-px patches (17), but in the tower itself, so stock Llava (vLLM) can hold the model. No
    # CLS token (SigLIP): llama.cpp's CLIP graph puts CLS last and drops the first patch
    # (llama.cpp issue 25814), so only a CLS-free tower answers there as it does here.
    patch_size: int = 16,
    lr: float = 1e-3,
    augment: bool = True,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> SiglipVisionModel:
    """`dtype`: autocast dtype (None: fp32)."""
    torch.manual_seed(seed)
    tower = SiglipVisionModel(vision_config(hidden_size, layers, patch_size))
    visual_proj = nn.Linear(hidden_size, hidden_size, bias=False)
    color_caps = [f"{c} shape" for c in COLORS]
    shape_caps = list(SHAPES)
    text = _BagOfWordsText(list(COLORS) + list(SHAPES) + ["shape"], hidden_size)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    transform = clip_style_transform(IMAGE_SIZE, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
    images = sorted({s["image"] for s in train_samples})
    pixels = torch.stack([transform(Image.open(image_root / p).convert("RGB")) for p in images])
    color_target = torch.tensor([COLORS.index(attributes.get(p, {}).get("color")) if "color" in attributes.get(p, {}) else -100 for p in images])
    shape_target = torch.tensor([SHAPES.index(attributes.get(p, {}).get("shape")) if "shape" in attributes.get(p, {}) else -100 for p in images])
    logger.info("vision pretraining on %d images (%d with color, %d with shape known)",
                len(images), int((color_target >= 0).sum()), int((shape_target >= 0).sum()))

    params = [*tower.parameters(), *visual_proj.parameters(), *text.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start, step = time.time(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            with cpu_autocast(dtype):
                batch = _augment(pixels[idx], generator) if augment else pixels[idx]
                emb = F.normalize(visual_proj(tower(pixel_values=batch).pooler_output), dim=-1)
                loss = 0.0
                for caps, target in ((color_caps, color_target[idx]), (shape_caps, shape_target[idx])):
                    txt = F.normalize(text(caps), dim=-1)
                    logits = logit_scale.exp().clamp(max=100) * emb @ txt.T
                    if (target >= 0).any():
                        loss = loss + F.cross_entropy(logits.float(), target, ignore_index=-100)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
        logger.info("vision epoch %d: loss %.4f", epoch + 1, loss.item())
    elapsed = time.time() - start
    logger.info("vision pretraining: %.0fs, %.0f images/s", elapsed, epochs * len(images) / elapsed)
    tower.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    ).save_pretrained(out)
    return tower


def build_llm(pairs: list[tuple[str, str, str]], attributes: dict[str, dict[str, str]], tokenizer, out: Path,
              epochs: int = 1, batch_size: int = 64, hidden_size: int = 192, layers: int = 4, heads: int = 3,
              init_std: float = 0.1, seed: int = 0, dtype: torch.dtype | None = None):
    """The LM learns the task's language with each image replaced by its caption words
    ("blue circle\nis there a red shape?" -> "no"), i.e. to reason over text the way a real
    LLM already can. Stitching then has to map images to what those words mean to it (the
    align stage), not to teach it yes/no logic from pixels."""
    torch.manual_seed(seed)
    config = llm_config(len(tokenizer), hidden_size=hidden_size, layers=layers, heads=heads, init_std=init_std)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")  # eager: faster on CPU here
    texts: list[tuple[str, str]] = []
    for image, question, answer in pairs:
        known = attributes.get(image, {})
        caption = " ".join(known[k] for k in ("color", "shape") if k in known)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{caption}\n{question}"}],
                                               tokenize=False, add_generation_prompt=True)
        texts.append((prompt, f"{answer}{tokenizer.eos_token}"))
    # Loss on the answer and its end token only, as in chat finetuning.
    encoded, prompt_lengths = [], []
    for prompt, reply in texts:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        encoded.append(torch.tensor(p_ids + tokenizer(reply, add_special_tokens=False)["input_ids"]))
        prompt_lengths.append(len(p_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    start = time.time()
    for epoch in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            rows = [encoded[j] for j in batch]
            ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
            positions = torch.arange(ids.shape[1])[None]
            mask = (positions < torch.tensor([len(r) for r in rows])[:, None]).long()
            answer = positions >= torch.tensor([prompt_lengths[j] for j in batch])[:, None]
            labels = ids.masked_fill((mask == 0) | ~answer, -100)
            with cpu_autocast(dtype):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        logger.info("llm epoch %d: loss %.4f", epoch + 1, loss.item())
    logger.info("llm pretraining: %.0fs", time.time() - start)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


MARKER = "experts.json"


def expert_settings(seed: int = 0, vision_epochs: int = 8, llm_epochs: int = 1,
                    max_train_samples: int | None = None, mixed_precision: str = "auto") -> dict:
    """What `experts.json` records: experts made with other settings are not reused."""
    return {"version": EXPERTS_VERSION, "seed": seed, "vision_epochs": vision_epochs,
            "llm_epochs": llm_epochs, "max_train_samples": max_train_samples,
            "mixed_precision": resolve_mixed_precision(mixed_precision)}


def build_experts(data_dir: str, out_dir: str, seed: int = 0, vision_epochs: int = 8, llm_epochs: int = 1,
                  max_train_samples: int | None = None, mixed_precision: str = "auto") -> dict[str, str]:
    """Train the three experts on the training split (`train_multiturn.json`: every training
    question once, grouped by image); returns their directories."""
    data, out = Path(data_dir), Path(out_dir)
    (out / MARKER).unlink(missing_ok=True)
    samples = json.loads((data / "train_multiturn.json").read_text())[:max_train_samples]
    pairs = qa_pairs(samples)
    paths = {k: out / k for k in ("tokenizer", "vision", "llm")}
    tokenizer = build_tokenizer(pairs, paths["tokenizer"])
    attributes = image_attributes(pairs)
    dtype = autocast_dtype(mixed_precision)
    build_vision(samples, data, attributes, paths["vision"], epochs=vision_epochs, seed=seed, dtype=dtype)
    build_llm(pairs, attributes, tokenizer, paths["llm"], epochs=llm_epochs, seed=seed, dtype=dtype)
    settings = expert_settings(seed=seed, vision_epochs=vision_epochs, llm_epochs=llm_epochs,
                               max_train_samples=max_train_samples, mixed_precision=mixed_precision)
    (out / MARKER).write_text(json.dumps(settings, indent=2) + "\n")  # written last: marks them complete
    return {k: str(v) for k, v in paths.items()}
