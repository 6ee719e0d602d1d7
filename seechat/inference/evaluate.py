"""Generation-based VQA evaluation: ask every question, compare the generated answer with the
reference by exact match after answer normalisation, write `predictions.jsonl`.

The prompt is the conversation up to its last human turn; the reference is the last gpt turn.
"""
from __future__ import annotations

import json
import re
import string
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seechat.data import VLMCollator, load_image, normalize_sample, read_llava_records
from seechat.inference.breakdown import breakdown
from seechat.models.base import SeeChatVLM
from seechat.models.prompting import prompt_ids

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, no punctuation, no articles, number words as digits, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(_NUMBERS.get(word, word) for word in text.split())


class PromptDataset(Dataset):
    """Questions as left-paddable generation prompts (images loaded in DataLoader workers)."""

    def __init__(self, records: Sequence[dict], model: SeeChatVLM, image_root: str | None):
        self.samples = [normalize_sample(r, i) for i, r in enumerate(records)]
        self.tokenizer = model.tokenizer
        self.transform = model.image_transform
        self.num_image_tokens = model.num_image_tokens
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.samples)

    def question_and_answer(self, index: int) -> tuple[list[dict], str]:
        turns = self.samples[index]["conversations"]
        last = max(i for i, t in enumerate(turns) if t["from"] == "gpt")
        return turns[:last], turns[last]["value"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        prompt, _ = self.question_and_answer(index)
        ids = prompt_ids(self.tokenizer, prompt, self.num_image_tokens)  # control tokens only from the template
        images = [self.transform(load_image(i, self.image_root, sample["id"])) for i in sample["images"]]
        return {
            "id": sample["id"],
            "input_ids": torch.tensor(ids),
            "pixel_values": torch.stack(images) if images else None,
            "num_images": len(images),
        }


@torch.no_grad()
def evaluate(
    model: SeeChatVLM,
    records: Sequence[dict],
    image_root: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    num_workers: int = 0,
    predictions_path: str | Path | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on `records` (LLaVA-format samples)."""
    model.eval()
    dataset = PromptDataset(records, model, image_root)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=VLMCollator(model.tokenizer.pad_token_id, padding_side="left"),
        num_workers=num_workers,
    )
    # The loader keeps the records' order, so a row's position (not its id, which a file may
    # repeat) finds its sample.
    correct, rows = 0, []
    device = model.device
    # No bar into a log file: redrawn bars would fill it (stderr not a terminal).
    for batch in tqdm(loader, desc="eval", leave=False, disable=not sys.stderr.isatty()):
        pixels = batch["pixel_values"]
        out = model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            None if pixels is None else pixels.to(device),
            batch["num_images"].to(device),
            max_new_tokens=max_new_tokens,
        )
        for sample_id, tokens in zip(batch["ids"], out):
            i = len(rows)
            if dataset.samples[i]["id"] != sample_id:
                raise RuntimeError(f"evaluation row {i} is sample {sample_id!r}, expected {dataset.samples[i]['id']!r}")
            prompt, answer = dataset.question_and_answer(i)
            prediction = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            hit = normalize_answer(prediction) == normalize_answer(answer)
            correct += hit
            rows.append({
                "id": sample_id,
                "question": prompt[-1]["value"].replace("<image>", "").strip(),
                "images": [str(x) for x in dataset.samples[i]["images"]],
                "answer": answer,
                "prediction": prediction,
                "correct": bool(hit),
                **({"type": records[i]["type"]} if isinstance(records[i], dict) and "type" in records[i] else {}),
            })
    if predictions_path:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    n = len(rows)
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n}


def evaluate_file(
    model: SeeChatVLM, path: str, image_root: str | None = None, max_samples: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    records = read_llava_records(path).records
    if max_samples:
        records = records[:max_samples]
    return evaluate(model, records, image_root=image_root, **kwargs)


def evaluate_to_dir(
    model: SeeChatVLM,
    path: str,
    output_dir: str | Path,
    predictions_path: str | Path | None = None,
    model_dir: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`evaluate_file`, writing `predictions.jsonl` (or `predictions_path`) and `summary.json`
    (accuracy, counts, timing, what was evaluated, the breakdown by question group and the
    commonest confusions: `breakdown.py`) to `output_dir`; returns the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = Path(predictions_path) if predictions_path else out / "predictions.jsonl"
    start = time.time()
    result = evaluate_file(model, path, predictions_path=predictions, **kwargs)
    seconds = time.time() - start
    summary = {
        **result,
        "model": model_dir,
        "data": str(path),
        "predictions": str(predictions),
        "seconds": round(seconds, 3),
        "samples_per_s": result["n"] / seconds if seconds > 0 else None,
        "settings": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, type(None)))},
        "breakdown": breakdown([json.loads(line) for line in predictions.read_text().splitlines()],
                               normalize_answer),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
