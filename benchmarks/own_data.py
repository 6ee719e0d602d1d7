"""Your own data, end to end, on data sets that ship in PyPI packages (seechat/experiments/own_data.py):
prepare -> `seechat experts` -> align -> finetune -> `seechat eval`, against a logistic
regression on the raw pixels over each question's answers, on the same split.

    OMP_NUM_THREADS=1 python benchmarks/own_data.py --datasets digits mnist5k

Times are wall-clock and CPU (user + system time of this process, all threads, and of its
data-loader workers) per step; on a shared machine the CPU time is the budget
(training_cpu_min: experts + align + finetune).
Writes benchmarks/results/own_data.json (one entry per data set; others already there are kept).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import commit, machine, write_results  # noqa: E402

OUT = Path(__file__).parent / "results" / "own_data.json"


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the data loaders' workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args, **kwargs):
    wall, cpu = time.time(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, {"wall_s": round(time.time() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}


def run_dataset(name: str, root: Path, size: str, reuse_experts: bool, overrides: list[str]) -> dict:
    from seechat.config import load_recipe
    from seechat.experiments.own_data import baseline, prepare
    from seechat.inference.evaluate import evaluate_to_dir
    from seechat.models.kinds import load
    from seechat.tools.experts.build import MARKER, build_experts
    from seechat.training.loop import run

    files = prepare(name, root / name)
    experts = root / name / "experts"
    times = {}
    if not (reuse_experts and (experts / MARKER).is_file()):
        _, times["experts"] = timed(build_experts, files["train"], str(experts), size=size, test=files["test"],
                                    progress=False)
    align, times["align"] = timed(run, load_recipe(experts / "align.yaml", overrides))
    finetune, times["finetune"] = timed(run, load_recipe(experts / "finetune.yaml", overrides))
    summary, times["eval"] = timed(evaluate_to_dir, load(finetune["final"]), files["test"],
                                   root / name / "eval", image_root=str(root / name), batch_size=128,
                                   max_new_tokens=4)
    info = json.loads((experts / MARKER).read_text())
    training = [k for k in ("experts", "align", "finetune") if k in times]
    return {
        "ours": summary["accuracy"], "by_type": {k: v["accuracy"] for k, v in summary["breakdown"]["by_group"].items()},
        "confusions": summary["breakdown"]["confusions"][:5], "classifier": baseline(name),
        "times": times, "training_cpu_min": round(sum(times[k]["cpu_s"] for k in training) / 60, 1),
        "training_wall_min": round(sum(times[k]["wall_s"] for k in training) / 60, 1),
        "experts": {k: info[k] for k in ("size", "vision", "llm_epochs", "seconds")},
        "steps": {"align": align["steps"], "finetune": finetune["steps"]}, "n_test": summary["n"],
        "commands": [f"python -c 'from seechat.experiments.own_data import prepare; prepare(\"{name}\", \"{name}\")'",
                     f"seechat experts --data {name}/train.json --out {name}/experts --test {name}/test.json",
                     f"seechat train --config {name}/experts/align.yaml",
                     f"seechat train --config {name}/experts/finetune.yaml",
                     f"seechat eval --model {name}/experts/runs/finetune/final --data {name}/test.json"],
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--root", default="runs/own_data", help="where data, experts and runs go")
    parser.add_argument("--size", default="small")
    parser.add_argument("--reuse-experts", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both recipes")
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for name in args.datasets:
        results[name] = run_dataset(name, Path(args.root), args.size, args.reuse_experts, args.overrides)
        results[name] |= {"commit": commit(), "machine": machine()}
        write_results(results, args.out, f": {name} ours {results[name]['ours']:.2%}, "
                                         f"classifier {results[name]['classifier']['overall']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
