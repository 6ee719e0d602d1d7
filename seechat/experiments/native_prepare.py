"""What the native path needs before its recipe runs, from easy-VQA's training split only:

1. a VQ image tokenizer trained on the training images (`<out>/vq`), with its reconstruction
   error and codebook usage on held-out test images (`<out>/vq/metrics.json`); with
   `semantic_tokens` in `vq_config`, a semantic tokenizer whose first codes are read off the
   stitched paths' pretrained vision tower (`semantic_tower`) and learn what it is pretrained on
   (the corpus' describing answers: color and shape), and
   in every case which words each code occurs with (`code_words.json`, for `code_word_share`);
2. the training conversations plus text -> image samples (`<out>/train_native.json`): for each
   training image whose color and shape the training answers determine (seechat.experiments.easyvqa.experts),
   "draw a <color> <shape>" answered by the image itself, so the model learns to draw
   (`draw_repeats` copies of each: the drawings are otherwise ~7% of the file), and with
   `image_only` one image-only sample per training image (an empty prompt answered by the image:
   the images' own distribution, every code a target, Chameleon's image documents).

The VQA part is `train_balanced.json` (one question per sample) or, with `questions_per_sample`
N > 1, the same balanced draws grouped by image into conversations of up to N questions: an
image's 64 codes are then read once per several answers instead of once per answer.

The codes of the questions' images are targets too with the recipe's `model.native.user_image_weight`.

    python -m seechat.experiments.native_prepare --data data/generated/easyvqa --out runs/native
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from seechat.experiments.easyvqa.experts import qa_pairs, image_attributes
from seechat.precision import autocast_dtype
from seechat.models.native.vq import code_word_weights, load_pixels, train_vq, vq_metrics
from seechat.tools.experts.corpus import Corpus, build_corpus

DRAW_PROMPT = "draw a {color} {shape}"


def caption_samples(samples: Sequence[dict]) -> list[dict]:
    """Text -> image samples for every image of `samples` (LLaVA format, one image each) whose
    color and shape its answers determine; the image sits in the assistant turn."""
    attributes = image_attributes(qa_pairs(list(samples)))
    out = []
    for image in sorted(attributes):
        known = attributes[image]
        if "color" in known and "shape" in known:
            out.append({"id": f"draw-{image}", "image": image, "conversations": [
                {"from": "human", "value": DRAW_PROMPT.format(**known)},
                {"from": "gpt", "value": "<image>"}]})
    return out


def attribute_labels(corpus: Corpus, images: Sequence[str]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Per attribute, its answers and each image's class among them (-100: unknown): the corpus'
    describing questions merged by answer set ("what color is the shape?" and "which color is
    the shape?" are one attribute; easy-VQA: 19 phrasings, 2 attributes)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for question, answers in corpus.heads.items():
        groups.setdefault(tuple(sorted(answers)), []).append(question)
    out = []
    for answers, questions in groups.items():
        index = {a: k for k, a in enumerate(answers)}
        known = [next((corpus.labels.get(i, {})[q] for q in questions if q in corpus.labels.get(i, {})), None)
                 for i in images]
        out.append((answers, torch.tensor([index[a] if a is not None else -100 for a in known])))
    return out


def image_only_samples(images: Sequence[str]) -> list[dict]:
    """One sample per image: an empty user turn answered by the image alone."""
    return [{"id": f"image-{image}", "image": image, "conversations": [
        {"from": "human", "value": ""}, {"from": "gpt", "value": "<image>"}]} for image in sorted(set(images))]


def grouped_questions(single: list[dict], turns: int, seed: int, passes: int = 2) -> list[dict]:
    """`passes` balanced draws of the single-question samples (as `train_balanced.json`: every
    yes/no family even), each grouped by image into conversations of at most `turns` questions."""
    from seechat.experiments.easyvqa.prepare import balanced, multiturn

    out = []
    for p in range(passes):
        draw = balanced(single, seed + p, passes=1)
        out += [{**s, "id": f"{s['id']}-p{p}"} for s in multiturn(draw, seed + p, turns)]
    random.Random(seed).shuffle(out)
    return out


def training_mix(train: list[dict], multiturn: list[dict], draw_repeats: int = 1,
                 image_only: bool = False) -> tuple[list[dict], dict[str, int]]:
    """The native training file: the VQA conversations, the drawings (x `draw_repeats`, ids made
    unique) and optionally the image-only samples; with the count of each."""
    if draw_repeats < 0:
        raise ValueError(f"draw_repeats={draw_repeats} must be >= 0")
    draws = caption_samples(multiturn)
    repeated = [{**d, "id": f"{d['id']}-{r}" if r else d["id"]} for r in range(draw_repeats) for d in draws]
    images = image_only_samples([s["image"] for s in multiturn]) if image_only else []
    return train + repeated + images, {"vqa": len(train), "draw": len(repeated), "image_only": len(images)}


def prepare_native(data_dir: str | Path, out_dir: str | Path, vq_epochs: int = 12, vq_config: dict | None = None,
                   heldout_images: int = 500, mixed_precision: str = "auto", seed: int = 0,
                   vq_max_seconds: float | None = None, draw_repeats: int = 1,
                   image_only: bool = False, questions_per_sample: int = 1,
                   semantic_tower: str | Path | None = None) -> dict[str, Any]:
    """Train the VQ tokenizer and write the native training file; returns paths and metrics.
    Reuses `<out>/vq` when its metrics file says it was made with the same settings.
    `semantic_tower`: the (transformers) vision tower a semantic tokenizer reads, a directory."""
    if questions_per_sample < 1:
        raise ValueError(f"questions_per_sample={questions_per_sample} must be >= 1")
    semantic = bool((vq_config or {}).get("semantic_tokens"))
    if semantic and not semantic_tower:
        raise ValueError(f"vq_config.semantic_tokens={vq_config['semantic_tokens']} needs semantic_tower: "
                         "the directory of a pretrained vision tower (the stitched paths' encoder)")
    data, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"vq_epochs": vq_epochs, "vq_config": vq_config or {}, "seed": seed,
                "vq_max_seconds": vq_max_seconds, "data": str(data)}
    if semantic:
        settings["semantic_tower"] = str(semantic_tower)
    metrics_path = out / "vq" / "metrics.json"
    vq_seconds = 0.0
    if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("settings") == settings:
        metrics = json.loads(metrics_path.read_text())
    else:
        samples = json.loads((data / "train_multiturn.json").read_text())
        images = sorted({s["image"] for s in samples})
        size = (vq_config or {}).get("image_size", 64)
        config = {k: v for k, v in (vq_config or {}).items() if k != "image_size"}
        attributes = attribute_labels(build_corpus(samples), images)  # the vision tower's own targets
        if semantic:
            from seechat.models.registry import build_encoder

            config.update(labels=attributes, tower=build_encoder({"backend": "hf", "name": str(semantic_tower),
                                                                  "feature_layer": -1}))
        pixels = load_pixels([data / p for p in images], size)
        start = time.time()
        vq = train_vq(pixels, epochs=vq_epochs, seed=seed, dtype=autocast_dtype(mixed_precision),
                      max_seconds=vq_max_seconds, **config)
        vq_seconds = time.time() - start
        vq.code_words = code_word_weights(vq, pixels, attributes)  # for model.native.code_word_share
        test = sorted({r["image"] for r in json.loads((data / "test.json").read_text())})[:heldout_images]
        metrics = {**vq_metrics(vq, load_pixels([data / p for p in test], size)),
                   "train_images": len(images), "train_seconds": vq_seconds, "heldout": "test images",
                   "settings": settings}
        vq.save_pretrained(out / "vq")
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")  # written last: marks the VQ complete
    vqa = (json.loads((data / "train_balanced.json").read_text()) if questions_per_sample == 1 else
           grouped_questions(json.loads((data / "train.json").read_text()), questions_per_sample, seed))
    samples, mix = training_mix(vqa, json.loads((data / "train_multiturn.json").read_text()), draw_repeats, image_only)
    (out / "train_native.json").write_text(json.dumps(samples))
    return {"vq": str(out / "vq"), "train": str(out / "train_native.json"), "vq_metrics": metrics,
            "draw_samples": mix["draw"], "mix": mix, "vq_seconds": vq_seconds}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m seechat.experiments.native_prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/generated/easyvqa")
    parser.add_argument("--out", default="runs/native")
    parser.add_argument("--vq-epochs", type=int, default=12)
    parser.add_argument("--draw-repeats", type=int, default=1, help="copies of each drawing sample")
    parser.add_argument("--image-only", action="store_true", help="add one image-only sample per training image")
    parser.add_argument("--semantic-tokens", type=int, default=0,
                        help="K > 0: K semantic codes per image read off --semantic-tower")
    parser.add_argument("--semantic-tower", help="a pretrained vision tower's directory (e.g. runs/demo/experts/vision)")
    parser.add_argument("--questions-per-sample", type=int, default=1,
                        help="group the balanced questions by image into conversations of up to N questions")
    args = parser.parse_args(argv)
    if args.semantic_tokens and not args.semantic_tower:
        parser.error(f"--semantic-tokens {args.semantic_tokens} needs --semantic-tower DIR "
                     "(a pretrained vision tower, e.g. runs/demo/experts/vision)")
    result = prepare_native(args.data, args.out, vq_epochs=args.vq_epochs, draw_repeats=args.draw_repeats,
                            image_only=args.image_only, questions_per_sample=args.questions_per_sample,
                            vq_config={"semantic_tokens": args.semantic_tokens} if args.semantic_tokens else None,
                            semantic_tower=args.semantic_tower)
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
