"""The embedded default's benchmark: `make demo`'s pipeline (seechat.experiments.easyvqa.pipeline.run_seed:
data, experts, align, finetune, test) for several seeds, and the spread of its accuracy.

    .venv/bin/python benchmarks/easyvqa.py                  seeds 0 1 2 (`make bench`)
    .venv/bin/python benchmarks/easyvqa.py --seeds 3        one more seed
    .venv/bin/python benchmarks/easyvqa.py --aggregate      only re-summarise the per-seed files

Each seed writes benchmarks/results/easyvqa_seed<N>.json (accuracy, per-type accuracy, seconds
per stage, precision, machine, commit). benchmarks/results/easyvqa.json summarises every per-seed
file made by the same commit and precision: min / median / max accuracy over seeds. `make demo`
is seed 0 of this benchmark.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from seechat.experiments.easyvqa.pipeline import run_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(seed: int, overrides: list[str]) -> dict:
    start, commit = time.time(), provenance.commit()  # the code the run imports is the code at its start
    result = run_seed(seed, overrides, fresh=True)
    out = {
        "command": f"python benchmarks/easyvqa.py --seeds {seed} " + " ".join(overrides),
        "seed": seed,
        "commit": commit,
        "mixed_precision": result["mixed_precision"],
        "test_accuracy": result["test"]["accuracy"],
        "test_correct": result["test"]["correct"],
        "test_questions": result["test"]["n"],
        "accuracy_by_type": result["accuracy_by_type"],
        "training_seconds": result["timings"],
        "align": result["align"],
        "finetune": result["finetune"],
        "wall_seconds": time.time() - start,
        "finished_at": time.time(),
        "machine": provenance.machine(),
    }
    (RESULTS / f"easyvqa_seed{seed}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def aggregate() -> dict:
    """Summarise the per-seed files of the newest commit/precision found among them."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("easyvqa_seed*.json"))]
    if not runs:
        raise SystemExit(f"no {RESULTS}/easyvqa_seed*.json: run some seeds first")
    newest = max(runs, key=lambda r: r.get("finished_at", 0))
    key = (newest.get("commit"), newest.get("mixed_precision"))
    same = sorted((r for r in runs if (r.get("commit"), r.get("mixed_precision")) == key), key=lambda r: r["seed"])
    accs = [r["test_accuracy"] for r in same]
    summary = {
        "what": "easy-VQA test exact match (9,673 questions), make demo's pipeline per seed",
        "command": "python benchmarks/easyvqa.py --seeds " + " ".join(str(r["seed"]) for r in same),
        "commit": key[0], "mixed_precision": key[1],
        "seeds": [r["seed"] for r in same],
        "accuracy": {"min": min(accs), "median": statistics.median(accs), "max": max(accs)},
        "training_seconds_median": statistics.median(r["training_seconds"]["training_total"] for r in same),
        "runs": [{k: r[k] for k in ("seed", "test_accuracy", "test_correct", "accuracy_by_type", "training_seconds")}
                 for r in same],
        "machine": same[-1]["machine"],
    }
    (RESULTS / "easyvqa.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--aggregate", action="store_true", help="only summarise existing per-seed files")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for both stages")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.aggregate:
        for seed in args.seeds:
            run_one(seed, args.overrides)
    print(json.dumps(aggregate(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
