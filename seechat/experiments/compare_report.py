"""The comparison's outputs: a stitched model's verdict on the native models' drawings and on VQ
reconstructions (the ceiling), and compare.json / compare.md / compare.png (see
seechat/experiments/compare.py)."""
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
def judge_drawings(native_dir: str, judge_dir: str, out: Path, cfg: dict, seed: int) -> dict[str, Any]:
    """Draw every (color, shape) `per_prompt` times (guidance `cfg_scale`, `temperature`,
    `top_k`), ask the judge model the color and the shape of each drawing, and report how often
    it agrees with the prompt."""
    from seechat.experiments.easyvqa.experts import COLORS, SHAPES
    from seechat.experiments.native_prepare import DRAW_PROMPT
    from seechat.models.kinds import load

    out.mkdir(parents=True, exist_ok=True)
    native, judge = load(native_dir), load(judge_dir)
    wanted = [{"color": c, "shape": s} for c in COLORS for s in SHAPES] * cfg["per_prompt"]
    generator = torch.Generator(device=native.device).manual_seed(seed)
    drawn = []
    for i in range(0, len(wanted), 48):  # batches: the guided twins double the rows
        drawn += native.generate_images([DRAW_PROMPT.format(**w) for w in wanted[i : i + 48]],
                                        temperature=cfg["temperature"], top_k=cfg.get("top_k", 0),
                                        cfg_scale=cfg.get("cfg_scale", 1.0), generator=generator)
    for i, (image, w) in enumerate(zip(drawn, wanted)):
        image.save(out / f"{i:03d}-{w['color']}-{w['shape']}.png")
    return _agreement(judge, drawn, wanted, out, "drawn")


@torch.no_grad()
def judge_reconstructions(vq_dir: str, judge_dir: str, data: Path, out: Path, n: int, seed: int) -> dict[str, Any]:
    """The judge on `n` test images whose color and shape the test answers determine, and on
    their VQ reconstructions: what a perfect native generator could score at most."""
    from seechat.experiments.easyvqa.experts import image_attributes, qa_pairs
    from seechat.models.kinds import load
    from seechat.models.native.vq import VQTokenizer, load_pixels, to_pil

    out.mkdir(parents=True, exist_ok=True)
    vq, judge = VQTokenizer.from_pretrained(vq_dir), load(judge_dir)
    test = json.loads((data / "test.json").read_text())
    known = {k: v for k, v in image_attributes(qa_pairs(test)).items() if "color" in v and "shape" in v}
    paths = random.Random(seed).sample(sorted(known), min(n, len(known)))
    truth = [known[p] for p in paths]
    pixels = load_pixels([data / p for p in paths], vq.image_size)
    recon = to_pil(vq.decode(vq.encode(pixels)))
    return {"codes_per_image": vq.num_codes, "codebook_size": vq.codebook_size,
            "originals": _agreement(judge, to_pil(pixels), truth, out, "original"),
            "reconstructions": _agreement(judge, recon, truth, out, "reconstructed")}


# ---------------------------------------------------------------------- files
def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    """mean (min-max) of a spread; one value alone when there was one seed."""
    if len(s["values"]) == 1:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ({scale * s['min']:.{digits}f}-{scale * s['max']:.{digits}f})"


def _table(results: dict) -> str:
    lines = ["| path | starts from | test accuracy %, mean (min-max) | seeds | image tokens / image | trained parameters "
             "| step time (ms) | training time (s) | drawings: colour / shape / both % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"].values():
        drawn = r.get("drawn")
        drawings = " / ".join(_pm(drawn[k], digits=0) for k in ("color", "shape", "both")) if drawn else "-"
        lines.append(f"| {r['path']} ({r['adapter']}) | {r['starts_from']} | {_pm(r['accuracy'])} | {len(r['seeds'])} "
                     f"| {r['image_tokens']} | {r['trained_parameters'] / 1e6:.2f} M | {_pm(r['step_seconds'], 1000, 0)} "
                     f"| {_pm(r['train_seconds'], 1, 0)} | {drawings} |")
    return "\n".join(lines)


def _host(machine: dict) -> str:
    """"2 CPUs (AMD EPYC, bf16 autocast)"; older results name the CPU count only."""
    if "cpu" not in machine:
        return f"{machine['cpus']} CPUs"
    precision = "bf16 autocast" if machine.get("mixed_precision_auto") == "bf16" else "fp32"
    return f"{machine['cpus']} CPUs ({machine['cpu']}, {precision})"


def markdown(results: dict) -> str:
    cfg = results["config"]
    first = next(iter(results["rows"].values()))
    parts = [f"# seechat compare: easy-VQA, {cfg['budget_seconds']} s of training per path, seeds {cfg['seeds']}", "",
             _table(results), "",
             f"Budget {cfg['budget_seconds']} s of training loop per path and seed (stitched: {cfg['align_fraction']:.0%} "
             f"align, rest finetune); test questions: {first['n']}; whole run {results['total_seconds']:.0f} s on "
             f"{_host(results['machine'])}. Accuracy and times: mean over seeds (min-max)."]
    if "vq" in results:
        vq = results["vq"]
        parts.append(f"Native VQ tokenizer ({vq['codes_per_image']} codes of {vq['codebook_size']}, trained "
                     f"{vq['train_seconds']:.0f} s, not counted): held-out PSNR {vq['psnr']:.1f} dB (MSE {vq['mse']:.4f}; "
                     f"mean image {vq['mean_image_psnr']:.1f} dB), codebook usage {vq['codebook_usage']:.0%}, "
                     f"perplexity {vq['perplexity']:.0f}.")
    if "generation" in results and any("drawn" in r for r in results["rows"].values()):
        g = results["generation"]
        line = (f"Drawings ('{g['prompt']}', 24 prompts x {g['per_prompt']}, guidance {g.get('cfg_scale', 1.0)}, "
                f"temperature {g['temperature']}, top-k {g.get('top_k', 0) or 'off'}): judged by the "
                f"{cfg['generation']['judge']} model of the same seed")
        if "vq_judged" in results:
            o, r = results["vq_judged"]["originals"], results["vq_judged"]["reconstructions"]
            line += (f"; on {r['images']} test images it scores both {o['both']:.0%} on the originals and "
                     f"{r['both']:.0%} on their VQ reconstructions (color {r['color']:.0%}, shape {r['shape']:.0%}): "
                     "the ceiling of any drawing")
        parts.append(line + ".")
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"].values())
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:  # a legend, not labels at the points: paths with similar token counts overlap
        acc = r["accuracy"]
        ax.errorbar(r["image_tokens"], 100 * acc["mean"], yerr=[[100 * (acc["mean"] - acc["min"])],
                                                                [100 * (acc["max"] - acc["mean"])]],
                    fmt="o", capsize=3, alpha=0.7,
                    label=f"{r['path']}: {100 * acc['mean']:.1f}%, {r['image_tokens']} tokens")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("image tokens per image (LM positions)")
    ax.set_ylabel("easy-VQA test accuracy (%), mean and min-max")
    ax.set_title(f"{results['config']['budget_seconds']} s training budget per path, seeds {results['config']['seeds']}",
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
