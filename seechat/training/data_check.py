"""`seechat data check --config R`: the training set read the way training will read it (the
recipe's tokenizer, chat template, image tokens, max_length, truncation), before a long job.

It reports counts (samples, images, text-only, skipped by reason, truncated, dropped), token
length and image size statistics, supervised tokens per sample, and one rendered sample with
its supervised spans marked `[[...]]`. It lists as *problems* what would waste a run: a sample
training would stop on (with `data.on_error: raise`) or silently skip - missing or unreadable
images, samples whose labels are all masked, a broken line - and a template that supervises
nothing. Samples dropped for length (`data.truncation: drop`, the default) are counted, not
problems.
"""
from __future__ import annotations

import copy
import statistics
from collections import Counter
from typing import Any

from PIL import Image

from seechat.data import IGNORE_INDEX, resolve_image_path, tokenize_conversation
from seechat.data.from_recipe import build_dataset
from seechat.data.schema import normalize_sample
from seechat.training.setup import model_for

# reason shown -> words of the skip message that mean it (first match wins)
REASONS = (
    ("image missing", ("image file not found",)),
    ("image unreadable", ("cannot read image",)),
    ("too long (dropped)", ("max_length",)),
    ("no supervised token", ("no supervised token", "nothing would be trained on")),
    ("duplicate id", ("id already used",)),
    ("<image> markers do not match images", ("marker",)),
)
NOT_PROBLEMS = {"too long (dropped)"}


def skip_reason(message: str) -> str:
    return next((name for name, words in REASONS if any(w in message for w in words)), "other: " + message[:80])


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": round(statistics.fmean(values), 1)}


def _image_sizes(sample: dict, image_root: Any) -> list[tuple[int, int]]:
    sizes = []
    for image in sample["images"]:
        if isinstance(image, Image.Image):
            sizes.append(image.size)
        elif isinstance(image, str):
            path = resolve_image_path(image, image_root)
            if path.is_file():
                with Image.open(path) as im:  # the header only
                    sizes.append(im.size)
    return sizes


def render_marked(item: dict, tokenizer, image_id: int) -> str:
    """The item's text with each run of image tokens as `<image>xN` and supervised runs in [[ ]]."""
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    out, i = [], 0
    while i < len(ids):
        j = i
        if ids[i] == image_id:
            while j < len(ids) and ids[j] == image_id:
                j += 1
            out.append(f"<image>x{j - i}")
        else:
            supervised = labels[i] != IGNORE_INDEX
            while j < len(ids) and ids[j] != image_id and (labels[j] != IGNORE_INDEX) == supervised:
                j += 1
            text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
            out.append(f"[[{text}]]" if supervised else text)
        i = j
    return "".join(out)


def check_data(recipe: dict, split: str = "train", model: Any = None) -> dict[str, Any]:
    """The report of `recipe`'s `data.<split>` (see the module docstring). `model`: the model
    whose tokenizer and image tokens to use (default: the one the recipe trains)."""
    model = model if model is not None else model_for(recipe)
    checked = copy.deepcopy(recipe)
    checked["data"]["on_error"] = "skip"  # count every bad sample instead of stopping at the first
    dataset = build_dataset(checked, model, split)
    data, tokenizer = recipe["data"], model.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    reasons: Counter = Counter()
    examples: dict[str, str] = {}
    lengths, supervised, sizes = [], [], []
    counts = Counter()
    first = None
    for index in range(len(dataset)):
        item = dataset[index]
        raw = dataset.samples[index]
        if "skipped" in item:
            reason = skip_reason(item["skipped"])
            reasons[reason] += 1
            examples.setdefault(reason, f"{item['id']}: {item['skipped']}")
            continue
        counts["kept"] += 1
        counts["images"] += item["num_images"]
        counts["text_only"] += item["num_images"] == 0
        lengths.append(len(item["input_ids"]))
        supervised.append(int((item["labels"] != IGNORE_INDEX).sum()))
        sample = normalize_sample(raw, index)
        sizes += _image_sizes(sample, data["image_root"])
        if data["max_length"] and len(item["input_ids"]) == data["max_length"]:
            full = tokenize_conversation(sample, tokenizer, model.num_image_tokens, max_length=None)
            counts["truncated"] += len(full["input_ids"]) > data["max_length"]
        if first is None:
            first = render_marked(item, tokenizer, image_id)
    problems = [f"{n} sample(s): {reason} (e.g. {examples[reason]})" for reason, n in reasons.items()
                if reason not in NOT_PROBLEMS]
    problems += [f"{where}: {why}" for where, why in dataset.read_skipped]
    if counts["kept"] == 0:
        problems.append("no usable sample: training would have nothing to learn from")
    elif sum(supervised) == 0:
        problems.append("the chat template supervises nothing: every label is masked")
    areas = Counter(f"{w}x{h}" for w, h in sizes)
    return {
        "data": str(data[split]), "split": split, "samples": len(dataset),
        "kept": counts["kept"], "images": counts["images"], "text_only": counts["text_only"],
        "skipped": dict(reasons), "skipped_examples": examples, "truncated": counts["truncated"],
        "dropped": reasons.get("too long (dropped)", 0), "broken_lines": len(dataset.read_skipped),
        "tokens": _stats(lengths), "supervised_tokens": _stats(supervised),
        "image_sizes": {"commonest": areas.most_common(3),
                        "width": _stats([w for w, _ in sizes]), "height": _stats([h for _, h in sizes])},
        "image_tokens_per_image": model.num_image_tokens, "max_length": data["max_length"],
        "rendered_sample": first, "problems": problems,
    }


def format_check(report: dict) -> str:
    def stats(s):
        return "-" if not s else f"min {s['min']}, median {s['median']}, max {s['max']} (mean {s['mean']})"

    lines = [
        f"{report['data']} ({report['split']}): {report['samples']} samples, {report['kept']} usable, "
        f"{report['images']} images ({report['image_tokens_per_image']} tokens each), {report['text_only']} text-only",
        f"skipped: {sum(report['skipped'].values())}"
        + "".join(f"\n  {n} {reason}: e.g. {report['skipped_examples'][reason]}" for reason, n in report["skipped"].items()),
        f"truncated to max_length={report['max_length']}: {report['truncated']}; dropped (too long): {report['dropped']}; "
        f"broken lines: {report['broken_lines']}",
        f"tokens per sample: {stats(report['tokens'])}",
        f"supervised tokens per sample: {stats(report['supervised_tokens'])}",
        f"image sizes: {', '.join(f'{s} ({n})' for s, n in report['image_sizes']['commonest']) or '-'}",
    ]
    if report["rendered_sample"] is not None:
        lines += ["one sample as training sees it ([[...]]: supervised):", report["rendered_sample"]]
    if report["problems"]:
        lines += [f"PROBLEMS ({len(report['problems'])}): fix these before a long run"]
        lines += [f"  {p}" for p in report["problems"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines)
