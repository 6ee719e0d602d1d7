"""Padding waste of the default data: random batches vs length-grouped batches vs packing.

    .venv/bin/python benchmarks/packing.py [--data data/generated/easyvqa/train_balanced.json]

Reads (never writes) the easy-VQA training file and the demo's tokenizer when they exist
(`make demo` makes them), else a generated LLaVA-style set with mixed answer lengths. Lengths
are the real tokenised lengths (image tokens included: 17 per image, the default recipe's
pixel-shuffled count). Batches follow the training loop's samplers for one epoch at the
recipe's batch size; waste = padding slots / all slots. Writes benchmarks/results/packing.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from seechat.data import LengthGroupedSampler, VLMDataset, normalize_sample, tokenize_conversation
from seechat.data.packing import padding_waste

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from provenance import write_results  # noqa: E402


def _generated() -> list[dict]:
    rng = random.Random(0)
    words = "the a red blue green circle square triangle left right of above below next to".split()
    return [{"id": str(i), "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\n" + " ".join(rng.choices(words, k=rng.randint(4, 20)))},
        {"from": "gpt", "value": " ".join(rng.choices(words, k=rng.choice([1, 2, 8, 40, 120])))}]}
        for i in range(4000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "data/generated/easyvqa/train_balanced.json"))
    parser.add_argument("--tokenizer", default=str(REPO / "runs/demo/experts/llm"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=17)
    parser.add_argument("--out", default=str(HERE / "results" / "packing.json"))
    args = parser.parse_args()
    from seechat.models.llm import load_tokenizer

    if Path(args.data).is_file() and Path(args.tokenizer).is_dir():
        records, source = json.loads(Path(args.data).read_text()), args.data
        tokenizer = load_tokenizer({"name_or_path": args.tokenizer})
    else:
        from seechat.experiments.tiny import train_tokenizer

        records, source = _generated(), "generated (easy-VQA data not present)"
        tokenizer = train_tokenizer([r["conversations"][1]["value"] for r in records[:200]], vocab_size=400)
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    lengths = [len(tokenize_conversation(normalize_sample(r, i), tokenizer, args.image_tokens)["input_ids"])
               for i, r in enumerate(records)]
    b = args.batch_size
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = VLMDataset(records, tokenizer, lambda image: image, args.image_tokens)
    grouped_order = list(LengthGroupedSampler(dataset.lengths(), b, seed=0))
    batches = {name: [order[i:i + b] for i in range(0, len(order), b)]
               for name, order in (("random", random_order), ("length_grouped", grouped_order))}
    result = {
        "command": "python " + " ".join(sys.argv), "data": source, "samples": len(lengths), "batch_size": b,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "length_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
        "padding_waste": {
            "random": padding_waste(lengths, batches["random"]),
            "length_grouped": padding_waste(lengths, batches["length_grouped"]),
            "random_packed": padding_waste(lengths, batches["random"], packed=True),
            "length_grouped_packed": padding_waste(lengths, batches["length_grouped"], packed=True),
        },
    }
    print(json.dumps(result["padding_waste"], indent=1))
    write_results(result, args.out)


if __name__ == "__main__":
    main()
