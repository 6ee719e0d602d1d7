"""`seechat experts --data train.json --out experts/`: the three experts trained on the user's
own training file, then a recipe pair (align, finetune) that stitches them.

Sizes come from a preset (`--size`); an epoch count is raised until the part has trained for
its preset's minimum number of steps, so a small data set still gets a useful number of updates.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from seechat.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "experts.json"  # written last: the experts in a directory holding it are complete
EXPERTS_VERSION = 2  # 2: the recipes fold the 4x4 patch grid into one token (adapter.pixel_shuffle 4)
# Patches per image side. The adapter folds the whole 4x4 grid into one token (pixel_shuffle
# GRID): the LM reads CLS + that token, 2 image tokens. The tower's CLS alone generalises poorly
# from a few thousand images (digits: 77% for a logistic regression on it, after 40 epochs),
# while its 16 patch tokens together keep what the pixels hold (97.7%, raw pixels 98.0%); read
# one token per patch (no pixel shuffle), the LM had to combine 16 tokens it never saw in its
# own training: 92.6% on digits, 98.2% with the grid folded (same experts; docs/data.md).
GRID = 4


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    vision_hidden: int
    vision_layers: int
    vision_epochs: int
    vision_min_steps: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_epochs: int
    llm_min_steps: int
    max_image_size: int
    batch_size: int = 64


# small: the easy-VQA demo's experts (0.8M-parameter tower, 1.9M-parameter LM)
PRESETS = {
    "tiny": Preset(vocab_size=300, vision_hidden=64, vision_layers=2, vision_epochs=1, vision_min_steps=40,
                   llm_hidden=64, llm_layers=2, llm_heads=2, llm_epochs=1, llm_min_steps=40, max_image_size=32,
                   batch_size=32),
    "small": Preset(vocab_size=400, vision_hidden=128, vision_layers=4, vision_epochs=8, vision_min_steps=240,
                    llm_hidden=192, llm_layers=4, llm_heads=3, llm_epochs=1, llm_min_steps=100,
                    max_image_size=64),
}


def epochs_for(n: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """`epochs`, raised until `n` samples in batches of `batch_size` make `min_steps` steps."""
    return max(epochs, math.ceil(min_steps / max(1, math.ceil(n / batch_size))))


def image_size_of(images: list[str], image_root: str | None, cap: int) -> int:
    """The tower's input side: the commonest longer side of (up to 200 of) the images, at most
    `cap`, rounded down to a multiple of GRID."""
    from seechat.data import load_image

    sides = Counter(max(load_image(p, image_root, p).size) for p in images[:200])
    side = min(sides.most_common(1)[0][0], cap)
    return max(GRID, side // GRID * GRID)


def _tokenizer_texts(pairs) -> list[str]:
    # The role names are in the corpus too, so that the chat template's "user"/"assistant" are
    # single tokens rather than spelled out letter by letter.
    return [p.question for p in pairs] + [p.answer for p in pairs] + ["user\n", "assistant\n"] * 1000


def check_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out}: the directory holds files but no {MARKER}; give a new or empty "
                        "directory (or one `seechat experts` wrote)")


def build_experts(data: str, out: str, image_root: str | None = None, size: str = "small", seed: int = 0,
                  max_samples: int | None = None, vision_epochs: int | None = None, llm_epochs: int | None = None,
                  mixed_precision: str = "auto", val: str | None = None, test: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train the experts on `data` (LLaVA JSON/JSONL) into `out` and write `out/align.yaml` and
    `out/finetune.yaml`; returns what `experts.json` records."""
    from seechat.data import read_llava_records
    from seechat.precision import autocast_dtype, resolve_mixed_precision
    from seechat.tools.experts.corpus import build_corpus
    from seechat.tools.experts.lm import build_llm
    from seechat.tools.experts.tokenizer import train_tokenizer
    from seechat.tools.experts.vision import build_vision

    if size not in PRESETS:
        raise UserError(f"--size {size}: unknown preset; valid: {', '.join(PRESETS)}")
    preset = PRESETS[size]
    outdir = Path(out)
    check_out_dir(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / MARKER).unlink(missing_ok=True)
    image_root = image_root if image_root is not None else str(Path(data).resolve().parent)
    records = read_llava_records(data).records[:max_samples]
    corpus = build_corpus(records)
    if not corpus.pairs:
        raise UserError(f"--data {data}: no human -> gpt turn pair to learn from")
    dtype = autocast_dtype(mixed_precision)
    timings, paths = {}, {k: outdir / k for k in ("tokenizer", "vision", "llm")}

    start = time.time()
    tokenizer = train_tokenizer(_tokenizer_texts(corpus.pairs), vocab_size=preset.vocab_size, template="chatml")
    tokenizer.save_pretrained(paths["tokenizer"])
    timings["tokenizer"] = time.time() - start

    images = corpus.images
    vision = {}
    if images:
        side = image_size_of(images, image_root, preset.max_image_size)
        v_epochs = vision_epochs or epochs_for(len(images), preset.batch_size, preset.vision_epochs,
                                               preset.vision_min_steps)
        start = time.time()
        build_vision(images, image_root, corpus.targets(images), paths["vision"], image_size=side,
                     epochs=v_epochs, batch_size=preset.batch_size, hidden_size=preset.vision_hidden,
                     layers=preset.vision_layers, patch_size=side // GRID, augment_shift=max(1, side // 10),
                     flip=False, seed=seed, dtype=dtype, progress=progress)
        timings["vision"] = time.time() - start
        vision = {"image_size": side, "patch_size": side // GRID, "epochs": v_epochs,
                  "objective": "contrastive" if corpus.heads else "self-supervised"}

    examples = [(f"{c}\n{p.question}" if (c := corpus.caption(p.images)) else p.question, p.answer)
                for p in corpus.pairs]
    l_epochs = llm_epochs or epochs_for(len(examples), preset.batch_size, preset.llm_epochs, preset.llm_min_steps)
    start = time.time()
    build_llm(examples, tokenizer, paths["llm"], epochs=l_epochs, batch_size=preset.batch_size,
              hidden_size=preset.llm_hidden, layers=preset.llm_layers, heads=preset.llm_heads, seed=seed,
              dtype=dtype, progress=progress)
    timings["llm"] = time.time() - start

    from seechat.tools.experts.recipes import write_recipes

    recipes = write_recipes(outdir, data, image_root, val=val, test=test, seed=seed, images=bool(images),
                            n_samples=len(records), batch_size=preset.batch_size, pixel_shuffle=GRID)
    info = {"version": EXPERTS_VERSION, "size": size, "preset": asdict(replace(preset)), "seed": seed,
            "data": str(data), "image_root": image_root, "samples": len(records), "pairs": len(corpus.pairs),
            "images": len(images), "describing_questions": {q: len(a) for q, a in corpus.heads.items()},
            "vision": vision, "llm_epochs": l_epochs, "mixed_precision": resolve_mixed_precision(mixed_precision),
            "seconds": {k: round(v, 1) for k, v in timings.items()},
            "recipes": {k: str(v) for k, v in recipes.items()}}
    (outdir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info

