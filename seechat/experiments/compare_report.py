"""The comparison's outputs: a stitched model's verdict on the native model's drawings, and
compare.json / compare.md / compare.png (see seechat/experiments/compare.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

COLOR_QUESTION, SHAPE_QUESTION = "what color is the shape?", "what shape is in the image?"


def _questions(images: list, truth: list[dict[str, str]], prefix: str) -> list[dict]:
    """Two records per image (color, shape), LLaVA format with PIL images."""
    records = []
    for i, (image, known) in enumerate(zip(images, truth)):
        for kind, question in (("color", COLOR_QUESTION), ("shape", SHAPE_QUESTION)):
            records.append({"id": f"{prefix}-{i}-{kind}", "images": [image], "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": known[kind]}]})
    return records


def _agreement(judge: Any, images: list, truth: list[dict[str, str]], out: Path, prefix: str) -> dict[str, float]:
    from seechat.inference.evaluate import evaluate

    evaluate(judge, _questions(images, truth, prefix), batch_size=64, max_new_tokens=4,
             predictions_path=out / f"{prefix}_judge.jsonl")
    rows = [json.loads(x) for x in (out / f"{prefix}_judge.jsonl").read_text().splitlines()]
    color, shape = rows[0::2], rows[1::2]
    return {"images": len(images),
            "color": sum(r["correct"] for r in color) / len(color),
            "shape": sum(r["correct"] for r in shape) / len(shape),
            "both": sum(c["correct"] and s["correct"] for c, s in zip(color, shape)) / len(color)}


@torch.no_grad()
def judge_drawings(native_dir: str, judge_dir: str, data: Path, out: Path, cfg: dict, seed: int) -> dict[str, Any]:
    """Draw every (color, shape) `per_prompt` times, ask the judge model the color and the shape
    of each drawing, and report how often it agrees with the prompt. For scale, the same judge on
    test images (originals and their VQ reconstructions) whose color and shape the test answers
    determine: the reconstructions bound what a perfect native generator could score."""
    from seechat.experiments.easyvqa.experts import COLORS, SHAPES, qa_pairs, image_attributes
    from seechat.experiments.native_prepare import DRAW_PROMPT
    from seechat.models.native.vq import load_pixels, to_pil
    from seechat.models.kinds import load

    out.mkdir(parents=True, exist_ok=True)
    native, judge = load(native_dir), load(judge_dir)
    wanted = [{"color": c, "shape": s} for c in COLORS for s in SHAPES] * cfg["per_prompt"]
    generator = torch.Generator(device=native.device).manual_seed(seed)
    drawn = native.generate_images([DRAW_PROMPT.format(**w) for w in wanted], temperature=cfg["temperature"],
                                   generator=generator)
    for i, (image, w) in enumerate(zip(drawn, wanted)):
        image.save(out / f"{i:03d}-{w['color']}-{w['shape']}.png")
    result = {"prompt": DRAW_PROMPT, "temperature": cfg["temperature"], "drawn": _agreement(judge, drawn, wanted, out, "drawn")}

    test = json.loads((data / "test.json").read_text())
    known = {k: v for k, v in image_attributes(qa_pairs(test)).items() if "color" in v and "shape" in v}
    paths = random.Random(seed).sample(sorted(known), min(cfg["reconstructions"], len(known)))
    if paths:
        truth = [known[p] for p in paths]
        pixels = load_pixels([data / p for p in paths], native.encoder.image_size)
        recon = to_pil(native.encoder.decode(native.encoder.encode(pixels)))
        originals = to_pil(pixels)
        result["test_originals"] = _agreement(judge, originals, truth, out, "original")
        result["test_reconstructions"] = _agreement(judge, recon, truth, out, "reconstructed")
    return result


# ---------------------------------------------------------------------- files
def _table(results: dict) -> str:
    lines = ["| path | test accuracy | image tokens / image | trained parameters | steps | step time (ms) | training time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"].values():
        lines.append(f"| {r['path']} ({r['adapter']}) | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | {r['image_tokens']} "
                     f"| {r['trained_parameters'] / 1e6:.2f} M | {r['steps']} | {1000 * r['step_seconds']:.0f} "
                     f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    cfg = results["config"]
    parts = [f"# seechat compare: easy-VQA, {cfg['budget_seconds']} s of training per path", "",
             _table(results), "",
             f"Budget {cfg['budget_seconds']} s of training loop per path (stitched: {cfg['align_fraction']:.0%} align, "
             f"rest finetune); test questions: {next(iter(results['rows'].values()))['n']}; "
             f"whole run {results['total_seconds']:.0f} s on {results['machine']['cpus']} CPUs."]
    if "vq" in results:
        vq = results["vq"]
        parts.append(f"Native VQ tokenizer ({vq['codes_per_image']} codes of {vq['codebook_size']}, trained "
                     f"{vq['train_seconds']:.0f} s, not counted): held-out PSNR {vq['psnr']:.1f} dB (MSE {vq['mse']:.4f}; "
                     f"mean image {vq['mean_image_psnr']:.1f} dB), codebook usage {vq['codebook_usage']:.0%}, "
                     f"perplexity {vq['perplexity']:.0f}.")
    if "generation" in results:
        g = results["generation"]
        d = g["drawn"]
        line = (f"Drawings ('{g['prompt']}', {d['images']} images, temperature {g['temperature']}): the "
                f"{cfg['generation']['judge']} model agrees on color {d['color']:.0%}, shape {d['shape']:.0%}, both {d['both']:.0%}")
        if "test_reconstructions" in g:
            o, r = g["test_originals"], g["test_reconstructions"]
            line += (f"; on {r['images']} test images it scores both {o['both']:.0%} on the originals and "
                     f"{r['both']:.0%} on their VQ reconstructions (color {r['color']:.0%}, shape {r['shape']:.0%})")
        parts.append(line + ".")
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"].values())
    fig, ax = plt.subplots(figsize=(6, 4))
    longest = max(r["train_seconds"] for r in rows) or 1.0
    for r in rows:  # a legend, not labels at the points: paths with similar token counts overlap
        ax.scatter(r["image_tokens"], 100 * r["accuracy"], s=60 + 600 * r["train_seconds"] / longest, alpha=0.6,
                   label=f"{r['path']}: {100 * r['accuracy']:.1f}%, {r['image_tokens']} tokens, {r['train_seconds']:.0f} s")
    ax.legend(fontsize=7, loc="best", markerscale=0.4)
    ax.set_xlabel("image tokens per image (LM positions)")
    ax.set_ylabel("easy-VQA test accuracy (%)")
    ax.set_title(f"{results['config']['budget_seconds']} s training budget per path (marker area ~ training time)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (directory / "compare.md").write_text(markdown(results))
    plot(results, directory / "compare.png")
