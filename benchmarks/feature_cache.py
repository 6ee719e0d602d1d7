"""Align-stage throughput with and without the frozen-encoder feature cache (data.feature_cache).

    .venv/bin/python benchmarks/feature_cache.py            both configurations, 3 rounds

Each round trains the same align recipe (encoder frozen, adapter trained, LM frozen; bf16
autocast where the CPU has bf16 units) for 3 epochs over generated images, once without the
cache and once with it, and compares training samples/s over epochs 2-3 (from the loop's
per-step log, so first-step warm-up counts for neither). The cache is filled before the loop
starts; the fill time is reported separately; later rounds reuse round 1's cache (the fill
computes nothing). Losses of the two runs must be identical. Data loading runs in the main process (num_workers 0), so
decoding and resizing images is part of the uncached cost, as it is of the CPU time of a run
with workers.

Configurations:
  vit_small_lm   336-px / 14 CLIP-like tower (576 patches, hidden 512, 12 layers) and a small
                 LM (hidden 256, 4 layers, Qwen2.5 vocabulary): an encoder-heavy pair, the case
                 the cache is for.
  easyvqa        the embedded default's geometry (64-px tower, 4 x 128; LM 4 x 192).
What the cache can save is the encoder's share of a step: with a 7B LM behind a ViT-L/14 it is
a few percent, so the gain there is small; the README states both.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llava_reference import CORPUS, lm_config, tower_config  # noqa: E402
from provenance import provenance, write_results  # noqa: E402

from seechat.config import load_recipe  # noqa: E402
from seechat.experiments.tiny import train_tokenizer  # noqa: E402
from seechat.training.loop import run  # noqa: E402

EPOCHS = 3
COLORS = ["red", "blue", "green"]
CONFIGS = {
    "vit_small_lm": {"tower": tower_config(336, 14, 512, 12), "lm": lm_config(256, 4), "images": 32,
                     "batch_size": 4},
    "easyvqa": {"tower": tower_config(64, 8, 128, 4), "lm": lm_config(192, 4, vocab=512), "images": 256,
                "batch_size": 32},
}


def make_data(root: Path, n: int, size: int) -> Path:
    """n images of a coloured shape and one caption-style question each (LLaVA JSON)."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        color = rng.choice(COLORS)
        box = sorted(rng.sample(range(size), 2))
        ImageDraw.Draw(image).rectangle([box[0], box[0], box[1], box[1]], fill=color)
        image.save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"A {color} square on a white background."}]})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def recipe(work: Path, cfg: dict, data: Path, out: str, cache: str) -> dict:
    tok = work / "tokenizer"
    if not tok.is_dir():  # trained on the benchmark's own text: answers take ~10 tokens, as real captions do
        texts = CORPUS + [f"Describe the image briefly. A {c} square on a white background." for c in COLORS] * 20
        train_tokenizer(texts, vocab_size=400, template="chatml").save_pretrained(tok)
    path = work / f"{out}.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "align", "output_dir": str(work / out),
        "model": {"encoder": {"backend": "hf", "pretrained": False, "arch": "clip", "config": cfg["tower"]},
                  "adapter": "mlp2x_gelu", "llm": {"tokenizer": str(tok), "config": cfg["lm"]}},
        "data": {"train": str(data), "image_root": str(data.parent), "num_workers": 0, "feature_cache": cache},
        "train": {"epochs": EPOCHS, "batch_size": cfg["batch_size"], "lr": 1e-3, "log_every": 1, "trackers": [],
                  "warmup_ratio": 0.0, "mixed_precision": "auto"},
    }))
    return load_recipe(path)


def one(work: Path, cfg: dict, data: Path, name: str, cache: str) -> dict:
    t = time.perf_counter()
    summary = run(recipe(work, cfg, data, name, cache))
    total = time.perf_counter() - t
    rows = [json.loads(line) for line in open(work / name / "metrics.jsonl")]
    # Each row's samples_per_s is samples so far / time so far: recover the time at each step.
    at = {r["step"]: r["step"] * cfg["batch_size"] / r["samples_per_s"] for r in rows}
    first, last = cfg["images"] // cfg["batch_size"], rows[-1]["step"]  # end of epoch 1, end
    return {"samples_per_s": (last - first) * cfg["batch_size"] / (at[last] - at[first]),
            "samples_per_s_all_epochs": summary["samples_per_s"], "train_seconds": summary["seconds"],
            "wall_seconds": total, "losses": [r["loss"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "feature_cache.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {**provenance(), "command": "python " + " ".join(sys.argv), "threads": args.threads,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "load_average_start": os.getloadavg(), "configs": {}}
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        work = Path(tempfile.mkdtemp(prefix=f"seechat-cache-{name}-"))
        data = make_data(work / "data", cfg["images"], cfg["tower"]["image_size"] * 3 // 2)
        cache_dir = str(work / "cache")
        rounds = []
        for r in range(args.rounds):
            plain = one(work, cfg, data, f"plain{r}", "off")
            cached = one(work, cfg, data, f"cached{r}", cache_dir)
            cached["fill_seconds"] = cached["wall_seconds"] - cached["train_seconds"] - (
                plain["wall_seconds"] - plain["train_seconds"])  # minus the common setup time
            rounds.append({"plain": plain, "cached": cached,
                           "speedup": cached["samples_per_s"] / plain["samples_per_s"],
                           "identical_losses": plain["losses"] == cached["losses"]})
            print(f"{name} round {r}: plain {plain['samples_per_s']:.2f}/s, cached "
                  f"{cached['samples_per_s']:.2f}/s, x{rounds[-1]['speedup']:.2f}, "
                  f"identical losses {rounds[-1]['identical_losses']}", flush=True)
        results["configs"][name] = {
            "images": cfg["images"], "batch_size": cfg["batch_size"], "tower": cfg["tower"], "lm": cfg["lm"],
            "speedup_median": statistics.median(r["speedup"] for r in rounds),
            "plain_samples_per_s": statistics.median(r["plain"]["samples_per_s"] for r in rounds),
            "cached_samples_per_s": statistics.median(r["cached"]["samples_per_s"] for r in rounds),
            "first_fill_seconds": rounds[0]["cached"]["fill_seconds"],
            "identical_losses": all(r["identical_losses"] for r in rounds),
            "rounds": rounds,
        }
    results["load_average_end"] = os.getloadavg()
    write_results(results, args.out)


if __name__ == "__main__":
    main()
