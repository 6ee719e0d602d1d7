"""`seechat compare`: every path - MLP projector, Q-Former, resampler, native early fusion - trained
on the same easy-VQA data under the same training-time budget, scored on the same test split.

    seechat compare                                   # recipes/compare.yaml, all test questions
    seechat compare budget_seconds=20 eval_samples=300 output_dir=runs/compare_smoke results_dir=runs/compare_smoke

Equal time, not equal steps: a path whose step is cheaper gets more steps. A cosine schedule has
to know its length, so each stage is first timed for a few steps (`calibration_steps`, not
counted), its `max_steps` set to budget / step time, and `train.max_seconds` stops it at the
budget if the estimate was optimistic. Stitched paths split their budget between align and
finetune (`align_fraction`). The experts are not counted: the stitched paths' tokenizer, vision
tower and LM (the demo's, `seechat.experiments.easyvqa.pipeline.ensure_default_inputs`) and the native path's VQ
tokenizer (its `train_seconds` is reported apart).

Writes `<results_dir>/compare.json`, `compare.md` (table) and `compare.png` (accuracy vs image
tokens, marker area ~ training time), and asks the MLP model about images the native model drew.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from seechat import resources
from seechat.config import RecipeError, apply_override
from seechat.recipe_paths import local_path

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = resources.recipe_file("compare.yaml")
NATIVE_RECIPE = resources.recipe_file("native_easyvqa.yaml")
KEYS = {"output_dir", "results_dir", "seed", "budget_seconds", "align_fraction", "calibration_steps",
        "eval_samples", "paths", "native", "generation", "experts", "data_dir"}
PATH_KEYS = ("output_dir", "results_dir", "experts", "data_dir")


def load_compare_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """recipes/compare.yaml (or `path`) with dotted `key=value` overrides, validated. Relative
    paths resolve as in recipes: against the file's directory (the packaged one: against
    ./recipes), and on the command line against the current directory."""
    path = Path(path or DEFAULT_CONFIG)
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg.setdefault("experts", None)
    cfg.setdefault("data_dir", None)
    base = Path.cwd() / "recipes" if resources.is_packaged_recipe(path) else path.parent
    _absolute_paths(cfg, base)
    for item in overrides:
        apply_override(cfg, item)
        _absolute_paths(cfg, Path.cwd())
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise RecipeError(f"unknown compare key(s) {unknown}; valid: {', '.join(sorted(KEYS))}")
    for name, spec in cfg["paths"].items():
        if spec.get("kind") not in ("stitched", "native"):
            raise RecipeError(f"compare path {name!r}: kind must be stitched or native, got {spec.get('kind')!r}")
    if cfg["calibration_steps"] < 2:  # the step time is measured between logged steps
        raise RecipeError(f"calibration_steps={cfg['calibration_steps']}; it must be at least 2")
    if cfg["generation"]["judge"] not in cfg["paths"]:
        raise RecipeError(f"generation.judge={cfg['generation']['judge']!r} is not one of the paths {list(cfg['paths'])}")
    return cfg


def _absolute_paths(cfg: dict, base: Path) -> None:
    for key in PATH_KEYS:
        if isinstance(cfg.get(key), str) and not Path(cfg[key]).is_absolute():
            cfg[key] = str(local_path(cfg[key], base))


# ---------------------------------------------------------------------- training under a budget
def _step_seconds(recipe: dict, steps: int, out: Path) -> float:
    """Seconds per optimizer step of `recipe`, from `steps` steps (the first, which starts the
    data workers, excluded)."""
    from seechat.training.loop import run

    probe = copy.deepcopy(recipe)
    probe["output_dir"] = str(out)
    probe["model"]["init_from"] = None  # same compute; the stage before may not exist yet
    probe["data"]["val"] = None  # a timing probe: nothing to validate
    probe["train"].update(max_steps=10**6, stop_after=steps, log_every=1, trackers=[], save_every=None,
                          max_seconds=None)
    shutil.rmtree(out, ignore_errors=True)
    run(probe)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    batch = probe["train"]["batch_size"] * probe["train"]["grad_accum"]
    elapsed = [r["step"] * batch / r["samples_per_s"] for r in records]
    return (elapsed[-1] - elapsed[0]) / max(len(elapsed) - 1, 1)


def train_for(recipe: dict, seconds: float, calibration_steps: int) -> dict[str, Any]:
    """Run `recipe` for `seconds` of training loop: steps sized from a timed probe, capped by time."""
    from seechat.inference.evaluate import evaluate_file
    from seechat.training.loop import run

    step = _step_seconds(recipe, calibration_steps, Path(recipe["output_dir"] + "-calibration"))
    recipe = copy.deepcopy(recipe)
    recipe["train"].update(max_steps=max(1, int(seconds / step)), max_seconds=seconds, trackers=[], save_every=None)
    summary = run(recipe, evaluate=evaluate_file)
    return {**summary, "calibrated_step_seconds": step, "planned_steps": recipe["train"]["max_steps"]}


def _common_overrides(cfg: dict, data: Path, name: str, stage: str) -> list[str]:
    return [f"seed={cfg['seed']}", f"output_dir={Path(cfg['output_dir']) / name / stage}",
            f"data.train={data / 'train_balanced.json'}", f"data.val={data / 'val.json'}",
            f"data.test={data / 'test.json'}", f"data.image_root={data}"]


def train_stitched(cfg: dict, name: str, spec: dict, experts: Path, data: Path) -> list[dict]:
    """The demo's align then finetune recipes with this path's adapter, budget split between them."""
    from seechat.config import load_recipe
    from seechat.experiments.easyvqa.pipeline import ALIGN_RECIPE, FINETUNE_RECIPE

    experts_keys = [f"model.encoder.name={experts / 'vision'}", f"llm.name_or_path={experts / 'llm'}"]
    budget, share = cfg["budget_seconds"], cfg["align_fraction"]
    align = load_recipe(ALIGN_RECIPE, [*_common_overrides(cfg, data, name, "align"), *experts_keys, *spec["overrides"]])
    first = train_for(align, budget * share, cfg["calibration_steps"])
    finetune = load_recipe(FINETUNE_RECIPE, [*_common_overrides(cfg, data, name, "finetune"), *experts_keys,
                                             *spec["overrides"], f"model.init_from={first['final']}"])
    return [first, train_for(finetune, budget * (1 - share), cfg["calibration_steps"])]


def train_native(cfg: dict, name: str, spec: dict, experts: Path, data: Path) -> tuple[list[dict], dict]:
    """VQ tokenizer + native data (seechat.experiments.native_prepare), then the native recipe on the budget."""
    from seechat.config import load_recipe
    from seechat.experiments.native_prepare import prepare_native

    prep = prepare_native(data, Path(cfg["output_dir"]) / name / "prepare", vq_epochs=cfg["native"]["vq_epochs"],
                          vq_config=cfg["native"]["vq_config"], seed=cfg["seed"],
                          vq_max_seconds=cfg["native"].get("vq_max_seconds"))
    recipe = load_recipe(NATIVE_RECIPE, [*_common_overrides(cfg, data, name, "train"), f"data.train={prep['train']}",
                                         f"model.native.vq={prep['vq']}", f"llm.tokenizer={experts / 'tokenizer'}",
                                         *spec["overrides"]])
    return [train_for(recipe, cfg["budget_seconds"], cfg["calibration_steps"])], prep


# ---------------------------------------------------------------------- evaluation
def evaluate_path(final: str, data: Path, out: Path, eval_samples: int | None) -> tuple[Any, dict]:
    from seechat.experiments.easyvqa.pipeline import question_type
    from seechat.inference.evaluate import evaluate_file
    from seechat.models.kinds import load

    model = load(final)
    start = time.time()
    predictions = out / "predictions.jsonl"
    result = evaluate_file(model, str(data / "test.json"), image_root=str(data), max_samples=eval_samples,
                           batch_size=128, max_new_tokens=4, predictions_path=predictions)
    result["eval_seconds"] = time.time() - start
    by_type: dict[str, list[int]] = {}
    for row in map(json.loads, predictions.read_text().splitlines()):
        by_type.setdefault(question_type(row), []).append(row["correct"])
    result["accuracy_by_type"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    return model, result


def _row(name: str, spec: dict, model: Any, stages: list[dict], result: dict) -> dict[str, Any]:
    steps = sum(s["steps"] for s in stages)
    loop = sum(s["loop_seconds"] for s in stages)
    adapter = model.config.get("adapter") or {}
    return {
        "path": name, "kind": spec["kind"], "adapter": adapter.get("type", "none (early fusion)"),
        # positions an image takes in the LM's sequence (native: codes + <im_start>/<im_end>)
        "image_tokens": getattr(model, "positions_per_image", model.num_image_tokens),
        "trained_parameters": max(s["trainable_parameters"] for s in stages),
        "steps": steps, "step_seconds": loop / max(steps, 1), "train_seconds": loop,
        "stages": [{k: s[k] for k in ("steps", "planned_steps", "loop_seconds", "calibrated_step_seconds",
                                      "stopped_by_max_seconds", "loss", "samples_per_s", "trainable_parameters")}
                   for s in stages],
        **{k: result[k] for k in ("accuracy", "correct", "n", "eval_seconds", "accuracy_by_type")},
    }


def main_run(cfg: dict) -> dict[str, Any]:
    """Train and evaluate every path, judge the native drawings, write the results."""
    from seechat.experiments.compare_report import judge_drawings, write_results

    start = time.time()
    if cfg["experts"]:
        experts = Path(cfg["experts"])
    else:
        from seechat.experiments.easyvqa.pipeline import EXPERTS_DIR, ensure_default_inputs

        ensure_default_inputs()
        experts = EXPERTS_DIR
    from seechat.experiments.easyvqa.pipeline import DATA_DIR

    data = Path(cfg["data_dir"] or DATA_DIR)
    out = Path(cfg["output_dir"])
    rows, models, extra = {}, {}, {}
    for name, spec in cfg["paths"].items():
        logger.info("compare: training %s (%s) for %.0fs", name, spec["kind"], cfg["budget_seconds"])
        if spec["kind"] == "native":
            stages, prep = train_native(cfg, name, spec, experts, data)
            extra["vq"] = prep["vq_metrics"]
            extra["draw_samples"] = prep["draw_samples"]
        else:
            stages = train_stitched(cfg, name, spec, experts, data)
        model, result = evaluate_path(stages[-1]["final"], data, out / name, cfg["eval_samples"])
        rows[name] = _row(name, spec, model, stages, result)
        models[name] = stages[-1]["final"]
        logger.info("compare: %s accuracy %.4f", name, result["accuracy"])
    natives = [n for n, s in cfg["paths"].items() if s["kind"] == "native"]
    if natives:
        extra["generation"] = judge_drawings(models[natives[0]], models[cfg["generation"]["judge"]], data,
                                             out / "drawn", cfg["generation"], cfg["seed"])
    results = {"config": cfg, "rows": rows, **extra, "total_seconds": time.time() - start,
               "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}}
    write_results(results, Path(cfg["results_dir"]))
    return results
