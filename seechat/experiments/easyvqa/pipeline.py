"""The embedded default, end to end: easy-VQA data -> tiny experts pretrained on the training
split -> align -> finetune -> test accuracy -> `runs/demo/report.md`.

Nothing pretrained can be downloaded here, so the experts (tokenizer, SigLIP-style vision tower,
Qwen2-style LM) are first trained on training data only (`experts.py`); then they are stitched
exactly like the real recipes do with downloaded experts. The test split is never trained on.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

from seechat import resources
from seechat.config import load_recipe

# Relative to the current directory: in a checkout `make demo` runs from its root, so this is
# the checkout's runs/demo; from an installed wheel, ./runs/demo of wherever it runs. The
# packaged recipes point here too (their paths resolve against ./recipes: seechat/recipe_paths.py).
DATA_DIR = Path("data/generated/easyvqa")
RUN_DIR = Path("runs/demo")
EXPERTS_DIR = RUN_DIR / "experts"
ALIGN_RECIPE = resources.recipe_file("easyvqa_align.yaml")
FINETUNE_RECIPE = resources.recipe_file("easyvqa_finetune.yaml")


def prepare_data(data_dir: Path = DATA_DIR) -> None:
    """Prepare easy-VQA into `data_dir` unless it holds what the current preparation writes."""
    from seechat.experiments.easyvqa.prepare import prepare, script_digest

    marker = data_dir / "prepared_by.json"
    if marker.is_file() and json.loads(marker.read_text()).get("script_sha256") == script_digest():
        return
    logging.getLogger(__name__).info("preparing easy-VQA into %s", data_dir)
    prepare(data_dir)


def demo_paths(stage: str) -> list[str]:
    """Overrides that point a demo recipe at DATA_DIR, EXPERTS_DIR and RUN_DIR explicitly (what
    the recipes say too, when run from the directory that holds runs/ and data/)."""
    data = DATA_DIR
    paths = [f"model.encoder.name={EXPERTS_DIR / 'vision'}", f"llm.name_or_path={EXPERTS_DIR / 'llm'}",
             f"data.train={data / 'train_balanced.json'}", f"data.val={data / 'val.json'}",
             f"data.test={data / 'test.json'}", f"data.image_root={data}", f"output_dir={RUN_DIR / stage}"]
    return paths + ([f"model.init_from={RUN_DIR / 'align' / 'final'}"] if stage == "finetune" else [])


def ensure_default_inputs(fresh: bool = False, **expert_kwargs: Any) -> float:
    """Data and tiny experts the default recipes point at; returns seconds spent training experts."""
    from seechat.experiments.easyvqa.experts import MARKER, build_experts, expert_settings

    prepare_data()
    marker = EXPERTS_DIR / MARKER
    if not fresh and marker.is_file() and json.loads(marker.read_text()) == expert_settings(**expert_kwargs):
        return 0.0
    start = time.time()
    build_experts(str(DATA_DIR), str(EXPERTS_DIR), **expert_kwargs)
    return time.time() - start


def run_pipeline(overrides: Sequence[str] = (), fresh: bool = True, eval_samples: int | None = None,
                 expert_kwargs: dict | None = None) -> dict[str, Any]:
    """Run every stage; returns the numbers the report and the benchmark print."""
    from seechat.inference.evaluate import evaluate_file
    from seechat.models.kinds import load
    from seechat.training.loop import run

    timings = {"experts": ensure_default_inputs(fresh=fresh, **(expert_kwargs or {}))}
    align = load_recipe(ALIGN_RECIPE, [*demo_paths("align"), *overrides])
    summary_align = run(align, evaluate=evaluate_file)
    timings["align"] = summary_align["seconds"]
    finetune = load_recipe(FINETUNE_RECIPE, [*demo_paths("finetune"), f"model.init_from={summary_align['final']}",
                                             *overrides])
    summary_ft = run(finetune, evaluate=evaluate_file)
    timings["finetune"] = summary_ft["seconds"]
    timings["training_total"] = sum(timings[k] for k in ("experts", "align", "finetune"))

    model = load(summary_ft["final"])
    start = time.time()
    test = evaluate_file(model, finetune["data"]["test"], image_root=finetune["data"]["image_root"],
                         max_samples=eval_samples, batch_size=finetune["eval"]["batch_size"],
                         max_new_tokens=finetune["eval"]["max_new_tokens"],
                         predictions_path=RUN_DIR / "predictions.jsonl")
    timings["eval"] = time.time() - start
    return {"test": test, "timings": timings, "align": _brief(summary_align), "finetune": _brief(summary_ft),
            "final": summary_ft["final"]}


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("steps", "loss", "samples_per_s", "seconds")} | {"skipped": len(summary["skipped"])}


def write_report(result: dict, examples: list[dict], path: Path = RUN_DIR / "report.md") -> str:
    t, test = result["timings"], result["test"]
    lines = [
        "# seechat demo: easy-VQA",
        "",
        f"Test exact match: **{test['accuracy']:.2%}** ({test['correct']}/{test['n']} questions), "
        f"seed {result.get('seed', 0)}, mixed precision: {result.get('mixed_precision', '?')}",
        "",
        "| question type | accuracy |",
        "|---|---|",
        *[f"| {k} | {v:.2%} |" for k, v in result.get("accuracy_by_type", {}).items()],
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in t.items()],
        "",
        f"Final model: `{result['final']}`. Predictions: `{RUN_DIR / 'predictions.jsonl'}`.",
        "",
        "## A few test questions",
        "",
        "| image | question | answer | model |",
        "|---|---|---|---|",
        *[f"| `{e['images'][0]}` | {e['question']} | {e['answer']} | {e['prediction']} |" for e in examples],
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def question_type(row: dict) -> str:
    """easy-VQA's four question kinds, for the per-type breakdown."""
    from seechat.experiments.easyvqa.experts import COLORS, SHAPES

    if row["answer"] in COLORS:
        return "color"
    if row["answer"] in SHAPES:
        return "shape"
    words = row["question"].rstrip("?").split()
    return "yes/no negated" if "not" in words or "no" in words else "yes/no"


def run_seed(seed: int = 0, overrides: Sequence[str] = (), fresh: bool = True,
             eval_samples: int | None = None, expert_kwargs: dict | None = None) -> dict[str, Any]:
    """The demo for one seed (experts and both recipes): what `make demo` runs with seed 0 and
    `benchmarks/easyvqa.py` runs for each of its seeds. Adds the per-type accuracy."""
    from seechat.precision import resolve_mixed_precision

    result = run_pipeline([*overrides, f"seed={seed}"], fresh=fresh, eval_samples=eval_samples,
                          expert_kwargs={**(expert_kwargs or {}), "seed": seed})
    rows = [json.loads(x) for x in (RUN_DIR / "predictions.jsonl").read_text().splitlines()]
    total: dict[str, int] = {}
    correct: dict[str, int] = {}
    for row in rows:
        kind = question_type(row)
        total[kind] = total.get(kind, 0) + 1
        correct[kind] = correct.get(kind, 0) + row["correct"]
    result["seed"] = seed
    result["accuracy_by_type"] = {k: correct[k] / total[k] for k in sorted(total)}
    align = load_recipe(ALIGN_RECIPE, [*demo_paths("align"), *overrides])
    result["mixed_precision"] = resolve_mixed_precision(align["train"]["mixed_precision"])
    result["examples"] = random.Random(0).sample(rows, min(8, len(rows)))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m seechat.experiments.easyvqa", description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the experts and of both recipes")
    parser.add_argument("--reuse-experts", action="store_true", help="keep runs/demo/experts if present")
    parser.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test questions")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for both stages")
    args = parser.parse_args(argv)
    result = run_seed(args.seed, args.overrides, fresh=not args.reuse_experts, eval_samples=args.eval_samples)
    print(write_report(result, result["examples"]))
    return 0
