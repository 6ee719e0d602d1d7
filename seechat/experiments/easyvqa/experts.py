"""Tiny experts for the embedded default, made from easy-VQA's TRAINING split only.

Nothing pretrained can be downloaded, so each expert is first trained the way its real
counterpart was, at toy scale:
  tokenizer  byte-level BPE on the training questions and answers, ChatML template
  vision     a SigLIP-architecture ViT with 16-px patches (4x4 grid, no CLS, no pooling head)
             trained with CLIP's contrastive (InfoNCE) loss through the mean of its patch tokens
             against captions made from the training answers ("red shape", "circle"); each image
             is scored against every distinct caption, so images sharing a caption are not pushed
             apart; random flips and shifts stand in for the variety of a web-scale image set
  llm        a Qwen2-architecture chat LM trained on the training questions with each image
             replaced by its caption words ("blue circle\nis there a red shape?" -> "no"): it
             learns the task's reasoning over text, as a real LLM brings it
The experts are saved with `save_pretrained`, and the recipes load them by path exactly as they
would load `openai/clip-vit-large-patch14-336` or `lmsys/vicuna-7b-v1.5`.

The training itself is `seechat experts`' (seechat/tools/experts/: vision.build_vision,
lm.build_llm); what is easy-VQA's own here is the tower and LM shape, the two caption heads
(colour, shape) and each image's attributes read off its answers, elimination included. The
experts are bit-identical to the ones this file trained itself before it called them (checked
on a 200-sample build, both parts' weights and every tokenizer and config file).
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from seechat.precision import autocast_dtype, resolve_mixed_precision
from seechat.experiments.tiny import tiny_llm_config, train_tokenizer
from seechat.tools.experts import lm, vision

logger = logging.getLogger(__name__)

# Bump when the way experts are made changes, so that runs/demo/experts made by an older
# version are rebuilt instead of reused (2: the LM's init std 0.02 -> 0.1; 3: the vision tower is
# SigLIP-shaped with 16-px patches, was CLIP with 8-px patches; 4: back to CLIP with 8-px patches;
# 5: SigLIP-shaped with 16-px patches, no pooling head, pretrained 24 epochs through the patch mean).
EXPERTS_VERSION = 5

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
IMAGE_SIZE = 64
# The tower's pretraining epochs: with 16 tokens per image 8 were too few for shape (see
# vision_config); 24 take less time than 8 did for the 8-px CLIP tower (65 tokens).
VISION_EPOCHS = 24


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


def vision_config(hidden_size: int = 128, layers: int = 4, patch_size: int = 16) -> SiglipVisionConfig:
    """The demo tower's shape: SigLIP with 16-px patches on 64-px images, a 4x4 grid and no CLS:
    16 image tokens with no pixel shuffle, which stock Llava (vLLM) and llama.cpp take as they
    are. No attention-pooling head: it is pretrained through the mean of its patch tokens, which
    the LM reads too. What made it as accurate as the earlier 8-px CLIP tower with CLS and
    pixel shuffle (17 tokens) was the pretraining length (VISION_EPOCHS), not the head: a
    logistic probe for shape on the mean of the tokens the adapter reads (test images) gave
    76.9% after 8 epochs and 98.0% after 24 (with SigLIP's head: 75.1% and 97.5%; the CLIP
    tower after 8: 96.3%). Demo: 99.41% test, median of 3 seeds (99.35-99.57%; benchmarks/results/easyvqa.json)."""
    config = SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=patch_size, hidden_size=hidden_size,
        intermediate_size=hidden_size * 4, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32), vision_use_head=False,
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
    epochs: int = VISION_EPOCHS,
    batch_size: int = 64,
    hidden_size: int = 128,
    layers: int = 4,
    patch_size: int = 16,
    lr: float = 1e-3,
    augment: bool = True,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> SiglipVisionModel:
    """`seechat experts`' tower training (seechat/tools/experts/vision.py) with easy-VQA's two
    heads: colour ("red shape", ...) and shape, each image's known from its answers.
    `dtype`: autocast dtype (None: fp32)."""
    images = sorted({s["image"] for s in train_samples})
    known = [attributes.get(p, {}) for p in images]
    heads = [([f"{c} shape" for c in COLORS], [COLORS.index(k["color"]) if "color" in k else -100 for k in known]),
             (list(SHAPES), [SHAPES.index(k["shape"]) if "shape" in k else -100 for k in known])]
    logger.info("vision pretraining on %d images (%d with color, %d with shape known)", len(images),
                sum(t >= 0 for t in heads[0][1]), sum(t >= 0 for t in heads[1][1]))
    return vision.build_vision(images, image_root, heads, out, image_size=IMAGE_SIZE,
                               vocab=list(COLORS) + list(SHAPES) + ["shape"], epochs=epochs, batch_size=batch_size,
                               lr=lr, augment_shift=6 if augment else None, flip=True, seed=seed, dtype=dtype,
                               config=vision_config(hidden_size, layers, patch_size))


def build_llm(pairs: list[tuple[str, str, str]], attributes: dict[str, dict[str, str]], tokenizer, out: Path,
              epochs: int = 1, batch_size: int = 64, hidden_size: int = 192, layers: int = 4, heads: int = 3,
              init_std: float = 0.1, seed: int = 0, dtype: torch.dtype | None = None):
    """The LM learns the task's language with each image replaced by its caption words
    ("blue circle\nis there a red shape?" -> "no"), i.e. to reason over text the way a real
    LLM already can. Stitching then has to map images to what those words mean to it (the
    align stage), not to teach it yes/no logic from pixels. `seechat experts`' LM training
    (seechat/tools/experts/lm.py)."""
    examples = []
    for image, question, answer in pairs:
        known = attributes.get(image, {})
        caption = " ".join(known[k] for k in ("color", "shape") if k in known)
        examples.append((f"{caption}\n{question}", answer))
    return lm.build_llm(examples, tokenizer, out, epochs=epochs, batch_size=batch_size, hidden_size=hidden_size,
                        layers=layers, heads=heads, init_std=init_std, lr=2e-3, seed=seed, dtype=dtype,
                        config=llm_config(len(tokenizer), hidden_size=hidden_size, layers=layers, heads=heads,
                                          init_std=init_std))


MARKER = "experts.json"


def expert_settings(seed: int = 0, vision_epochs: int = VISION_EPOCHS, llm_epochs: int = 1,
                    max_train_samples: int | None = None, mixed_precision: str = "auto") -> dict:
    """What `experts.json` records: experts made with other settings are not reused."""
    return {"version": EXPERTS_VERSION, "seed": seed, "vision_epochs": vision_epochs,
            "llm_epochs": llm_epochs, "max_train_samples": max_train_samples,
            "mixed_precision": resolve_mixed_precision(mixed_precision)}


def build_experts(data_dir: str, out_dir: str, seed: int = 0, vision_epochs: int = VISION_EPOCHS, llm_epochs: int = 1,
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
