"""Tokens per image against what the judge still sees: VQ tokenizers of several grids and codebook
sizes, trained on easy-VQA's training images, their reconstructions of held-out test images
shown to the judge (a stitched model: colour and shape questions, seechat/experiments/compare_report.py).

    python -m seechat.experiments.vq_sweep --data data/generated/easyvqa --judge runs/demo/finetune/final \
        --out runs/vq_sweep

Writes `<out>/vq_sweep.json` and `vq_sweep.md` (one row per tokenizer). Without `--judge` only the
pixel metrics are measured; `--judge` later reuses the trained tokenizers (`<out>/<name>/`).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

# name -> VQTokenizer settings (64-px images): downsample 3 gives 8x8 codes, 2 gives 16x16
CONFIGS: dict[str, dict[str, Any]] = {
    "8x8-1000": {"channels": 32, "downsample": 3, "levels": [8, 5, 5, 5]},
    "8x8-15360": {"channels": 32, "downsample": 3, "levels": [8, 8, 8, 6, 5]},
    "16x16-1000": {"channels": 32, "downsample": 2, "levels": [8, 5, 5, 5]},
}


def train_one(data: Path, out: Path, name: str, config: dict, epochs: int, max_seconds: float | None,
              heldout: int = 500, seed: int = 0) -> dict[str, Any]:
    """Train (or reuse) the tokenizer `name`; returns its pixel metrics on held-out test images."""
    from seechat.models.native.vq import load_pixels, train_vq, vq_metrics
    from seechat.precision import autocast_dtype

    where = out / name
    if (where / "metrics.json").is_file():
        return json.loads((where / "metrics.json").read_text())
    samples = json.loads((data / "train_multiturn.json").read_text())
    images = sorted({s["image"] for s in samples})
    start = time.time()
    vq = train_vq(load_pixels([data / p for p in images], 64), epochs=epochs, seed=seed,
                  dtype=autocast_dtype("auto"), max_seconds=max_seconds, **config)
    seconds = time.time() - start
    test = sorted({r["image"] for r in json.loads((data / "test.json").read_text())})[:heldout]
    metrics = {**vq_metrics(vq, load_pixels([data / p for p in test], 64)), "train_seconds": seconds,
               "epochs": epochs, "config": config}
    vq.save_pretrained(where)
    (where / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def table(rows: dict[str, dict]) -> str:
    lines = ["| tokenizer | codes / image | codebook | bits / image | held-out PSNR (dB) | codebook usage "
             "| judge on reconstructions: colour / shape / both | training (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        judged = m.get("judged")
        verdict = (f"{judged['color']:.0%} / {judged['shape']:.0%} / {judged['both']:.0%}" if judged else "-")
        lines.append(f"| {name} | {m['codes_per_image']} | {m['codebook_size']} "
                     f"| {m['codes_per_image'] * math.log2(m['codebook_size']):.0f} | {m['psnr']:.1f} "
                     f"| {m['codebook_usage']:.0%} | {verdict} | {m['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def sweep(data: str | Path, out: str | Path, names: Sequence[str], judge: str | None = None, epochs: int = 12,
          max_seconds: float | None = 300, judged_images: int = 200) -> dict[str, dict]:
    from seechat.experiments.compare_report import judge_reconstructions

    data, out = Path(data), Path(out)
    rows = {}
    for name in names:
        rows[name] = train_one(data, out, name, CONFIGS[name], epochs, max_seconds)
        if judge:
            verdict = judge_reconstructions(str(out / name), judge, data, out / name / "judged", judged_images, 0)
            rows[name]["judged"] = verdict["reconstructions"]
            rows[name]["judged_originals"] = verdict["originals"]
    (out / "vq_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "vq_sweep.md").write_text(table(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m seechat.experiments.vq_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/generated/easyvqa")
    parser.add_argument("--out", default="runs/vq_sweep")
    parser.add_argument("--judge", default=None, help="a saved stitched model that answers colour/shape questions")
    parser.add_argument("--names", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-seconds", type=float, default=300, help="per tokenizer")
    parser.add_argument("--judged-images", type=int, default=200)
    args = parser.parse_args(argv)
    rows = sweep(args.data, args.out, args.names, args.judge, args.epochs, args.max_seconds, args.judged_images)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
