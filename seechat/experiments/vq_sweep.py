"""Tokens per image against what the judge still sees: VQ tokenizers of several grids and codebook
sizes, trained on easy-VQA's training images, their reconstructions of held-out test images
shown to the judge (a stitched model: colour and shape questions, seechat/experiments/compare_report.py).

    python -m seechat.experiments.vq_sweep --data data/generated/easyvqa --judge runs/demo/finetune/final \
        --out runs/vq_sweep

Writes `<out>/vq_sweep.json` and `vq_sweep.md` (one row per tokenizer). `--judge` later reuses the
trained tokenizers (`<out>/<name>/`). `--pixel-judge` adds a second, cheaper judge: a small CNN
trained on the training images' colour and shape (read off their answers), which needs no
stitched model - a proxy for the stitched judge, reported as such.
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


class PixelJudge:
    """A small CNN with a colour head and a shape head, trained on the training images."""

    def __init__(self, seed: int = 0):
        import torch
        from torch import nn

        from seechat.experiments.easyvqa.experts import COLORS, SHAPES

        torch.manual_seed(seed)
        self.colors, self.shapes = list(COLORS), list(SHAPES)
        layers, width = [], 3
        for out in (32, 64, 64, 128):  # 64 -> 4 px
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.ReLU()]
            width = out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, len(self.colors) + len(self.shapes)))

    def fit(self, pixels, truth: list[dict], epochs: int = 24, batch_size: int = 64) -> "PixelJudge":
        import torch
        import torch.nn.functional as F

        color = torch.tensor([self.colors.index(t["color"]) for t in truth])
        shape = torch.tensor([self.shapes.index(t["shape"]) for t in truth])
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        self.net.train()
        for _ in range(epochs):
            order = torch.randperm(len(pixels))
            for i in range(0, len(pixels), batch_size):
                idx = order[i : i + batch_size]
                out = self.net(pixels[idx])
                k = len(self.colors)
                loss = F.cross_entropy(out[:, :k], color[idx]) + F.cross_entropy(out[:, k:], shape[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    def agreement(self, pixels, truth: list[dict]) -> dict[str, float]:
        import torch

        with torch.no_grad():
            out = torch.cat([self.net(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
        k = len(self.colors)
        color = [self.colors[i] == t["color"] for i, t in zip(out[:, :k].argmax(-1).tolist(), truth)]
        shape = [self.shapes[i] == t["shape"] for i, t in zip(out[:, k:].argmax(-1).tolist(), truth)]
        n = len(truth)
        return {"images": n, "color": sum(color) / n, "shape": sum(shape) / n,
                "both": sum(c and s for c, s in zip(color, shape)) / n}


def _known(data: Path, split: str) -> dict[str, dict[str, str]]:
    from seechat.experiments.easyvqa.experts import image_attributes, qa_pairs

    samples = json.loads((data / split).read_text())
    return {k: v for k, v in image_attributes(qa_pairs(samples)).items() if "color" in v and "shape" in v}


def pixel_judge_rows(data: Path, out: Path, rows: dict[str, dict], judged_images: int) -> dict[str, Any]:
    """Train the pixel judge on the training images, then score test originals and each tokenizer's
    reconstructions of them; adds `pixel_judged` to every row, returns the originals' score."""
    import random

    from seechat.models.native.vq import VQTokenizer, load_pixels

    train = _known(data, "train_multiturn.json")
    judge = PixelJudge().fit(load_pixels([data / p for p in sorted(train)], 64), [train[p] for p in sorted(train)])
    test = _known(data, "test.json")
    paths = random.Random(0).sample(sorted(test), min(judged_images, len(test)))
    pixels, truth = load_pixels([data / p for p in paths], 64), [test[p] for p in paths]
    for name in rows:
        vq = VQTokenizer.from_pretrained(out / name)
        rows[name]["pixel_judged"] = judge.agreement(vq.decode(vq.encode(pixels)), truth)
    return judge.agreement(pixels, truth)


def table(rows: dict[str, dict]) -> str:
    lines = ["| tokenizer | codes / image | codebook | bits / image | held-out PSNR (dB) | codebook usage "
             "| judge on reconstructions: colour / shape / both | training (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        judged = m.get("judged")
        verdict = (f"{judged['color']:.0%} / {judged['shape']:.0%} / {judged['both']:.0%}" if judged else "-")
        pixel = m.get("pixel_judged")
        verdict += (f" (pixel judge: {pixel['color']:.0%} / {pixel['shape']:.0%} / {pixel['both']:.0%})"
                    if pixel else "")
        lines.append(f"| {name} | {m['codes_per_image']} | {m['codebook_size']} "
                     f"| {m['codes_per_image'] * math.log2(m['codebook_size']):.0f} | {m['psnr']:.1f} "
                     f"| {m['codebook_usage']:.0%} | {verdict} | {m['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def sweep(data: str | Path, out: str | Path, names: Sequence[str], judge: str | None = None, epochs: int = 12,
          max_seconds: float | None = 300, judged_images: int = 200, pixel_judge: bool = False) -> dict[str, dict]:
    from seechat.experiments.compare_report import judge_reconstructions

    data, out = Path(data), Path(out)
    rows = {}
    for name in names:
        rows[name] = train_one(data, out, name, CONFIGS[name], epochs, max_seconds)
        if judge:
            verdict = judge_reconstructions(str(out / name), judge, data, out / name / "judged", judged_images, 0)
            rows[name]["judged"] = verdict["reconstructions"]
            rows[name]["judged_originals"] = verdict["originals"]
    if pixel_judge:
        originals = pixel_judge_rows(data, out, rows, judged_images)
        for name in rows:
            rows[name]["pixel_judged_originals"] = originals
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
    parser.add_argument("--pixel-judge", action="store_true", help="also score with a small CNN judge (see above)")
    args = parser.parse_args(argv)
    rows = sweep(args.data, args.out, args.names, args.judge, args.epochs, args.max_seconds, args.judged_images,
                 args.pixel_judge)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
