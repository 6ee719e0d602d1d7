"""The embedded default's benchmark: the whole easy-VQA pipeline from scratch (experts, align,
finetune), then exact match on the official test split (9,673 questions).

    .venv/bin/python benchmarks/easyvqa.py              (or `make bench`)
    .venv/bin/python benchmarks/easyvqa.py --seed 1     (experts and recipes seeded with 1)

Writes benchmarks/results/easyvqa.json: accuracy, per-question-type accuracy, training seconds per
stage (the goal: >= 97% with <= 600 s of training on a 2-core CPU), machine facts, command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from seechat.demo.experts import COLORS, SHAPES
from seechat.demo.pipeline import RUN_DIR, run_pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "easyvqa.json"


def question_type(row: dict) -> str:
    if row["answer"] in COLORS:
        return "color"
    if row["answer"] in SHAPES:
        return "shape"
    words = row["question"].rstrip("?").split()
    return "yes/no negated" if "not" in words or "no" in words else "yes/no"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the experts and of both recipes")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for both stages")
    args = parser.parse_args()
    start = time.time()
    overrides = [*args.overrides, f"seed={args.seed}"]
    result = run_pipeline(overrides, fresh=True, expert_kwargs={"seed": args.seed})
    rows = [json.loads(x) for x in (RUN_DIR / "predictions.jsonl").read_text().splitlines()]
    total, correct = Counter(), Counter()
    for row in rows:
        total[question_type(row)] += 1
        correct[question_type(row)] += row["correct"]
    out = {
        "command": "python benchmarks/easyvqa.py " + " ".join(sys.argv[1:]),
        "test_accuracy": result["test"]["accuracy"],
        "test_correct": result["test"]["correct"],
        "test_questions": result["test"]["n"],
        "accuracy_by_type": {k: correct[k] / total[k] for k in sorted(total)},
        "training_seconds": result["timings"],
        "training_budget_seconds": 600,
        "align": result["align"],
        "finetune": result["finetune"],
        "wall_seconds": time.time() - start,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    path = RESULTS if args.seed == 0 else RESULTS.with_name(f"easyvqa_seed{args.seed}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
