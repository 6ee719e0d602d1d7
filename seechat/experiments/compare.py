"""`seechat compare`: every path - MLP projector, Q-Former, resampler, native early fusion grown
from the text LM (plain, or with code rows shaped by the codebook), native from scratch - trained
on the same easy-VQA data under the same training-time budget, over several seeds, scored on the
same test split.

    seechat compare                                   # recipes/compare.yaml: 6 paths x 3 seeds
    seechat compare --quick                           # smoke run: tiny budget, one seed, few questions
    seechat compare budget_seconds=20 eval_samples=300 seeds=[0] output_dir=runs/compare_smoke results_dir=runs/compare_smoke

Equal time, not equal steps: a path whose step is cheaper gets more steps. A cosine schedule has
to know its length, so each stage is first timed for a few steps (`calibration_steps`, not
counted), its `max_steps` set to fill the budget (`planned_steps`: the probe's slow start, then
its steady step), and `train.max_seconds` stops it at the
budget if the estimate was optimistic. Stitched paths split their budget between align and
finetune (`align_fraction`). The experts are not counted and are the same for every path and
seed: the demo's tokenizer, vision tower and text LM (`seechat.experiments.easyvqa.pipeline.ensure_default_inputs`;
the native path grown from the text LM starts from that same LM) and the native paths' VQ
tokenizer (its `train_seconds` is reported apart). Seeds change the training runs only.

Writes `<results_dir>/compare.json`, `compare.md` (table: mean and min-max over seeds) and
`compare.png`, and asks the judge (a stitched model of the same seed) the colour and shape of
the images each native model drew.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from seechat import resources
from seechat.config import RecipeError, apply_override
from seechat.precision import host
from seechat.recipe_paths import local_path

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = resources.recipe_file("compare.yaml")
NATIVE_RECIPE = resources.recipe_file("native_easyvqa.yaml")
KEYS = {"output_dir", "results_dir", "seeds", "budget_seconds", "align_fraction", "calibration_steps",
        "eval_samples", "paths", "overrides", "native", "generation", "experts", "data_dir"}
# `--quick`: every path and every step of the full run, at a size that takes about a minute.
QUICK = ["seeds=[0]", "budget_seconds=2", "calibration_steps=2", "eval_samples=24", "native.vq_epochs=1",
         "native.vq_max_seconds=5", "generation.per_prompt=1", "generation.reconstructions=8",
         "overrides=[train.batch_size=8,data.num_workers=0,eval.max_samples=8,eval.batch_size=16,data.feature_cache=auto]"]
PATH_KEYS = ("output_dir", "results_dir", "experts", "data_dir")


def load_compare_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                        quick: bool = False) -> dict[str, Any]:
    """recipes/compare.yaml (or `path`) with dotted `key=value` overrides, validated. Relative
    paths resolve as in recipes: against the file's directory (the packaged one: against
    ./recipes), and on the command line against the current directory. `quick` puts the `QUICK`
    settings (and output under runs/compare_quick) before `overrides`."""
    path = Path(path or DEFAULT_CONFIG)
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg.setdefault("experts", None)
    cfg.setdefault("data_dir", None)
    cfg.setdefault("overrides", [])
    base = Path.cwd() / "recipes" if resources.is_packaged_recipe(path) else path.parent
    _absolute_paths(cfg, base)
    if quick:
        overrides = [*QUICK, "output_dir=runs/compare_quick", "results_dir=runs/compare_quick", *overrides]
    for item in overrides:
        apply_override(cfg, item)
        _absolute_paths(cfg, Path.cwd())
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise RecipeError(f"unknown compare key(s) {unknown}; valid: {', '.join(sorted(KEYS))}")
    for name, spec in cfg["paths"].items():
        if spec.get("kind") not in ("stitched", "native"):
            raise RecipeError(f"compare path {name!r}: kind must be stitched or native, got {spec.get('kind')!r}")
    if not isinstance(cfg["seeds"], list) or not cfg["seeds"] or not all(isinstance(x, int) for x in cfg["seeds"]):
        raise RecipeError(f"seeds={cfg['seeds']!r}: give a non-empty list of integers, e.g. seeds=[0,1,2]")
    if cfg["calibration_steps"] < 2:  # the step time is measured between logged steps
        raise RecipeError(f"calibration_steps={cfg['calibration_steps']}; it must be at least 2")
    grouped = (cfg.get("native") or {}).get("questions_per_sample", 1)
    if not isinstance(grouped, int) or isinstance(grouped, bool) or grouped < 1:
        raise RecipeError(f"native.questions_per_sample={grouped!r}; give an integer >= 1 (1: one question per sample)")
    if cfg["generation"]["judge"] not in cfg["paths"]:
        raise RecipeError(f"generation.judge={cfg['generation']['judge']!r} is not one of the paths {list(cfg['paths'])}")
    return cfg


def _absolute_paths(cfg: dict, base: Path) -> None:
    for key in PATH_KEYS:
        if isinstance(cfg.get(key), str) and not Path(cfg[key]).is_absolute():
            cfg[key] = str(local_path(cfg[key], base))


# ---------------------------------------------------------------------- training under a budget
def _probe_seconds(recipe: dict, steps: int, out: Path) -> list[float]:
    """Training-loop seconds at each of the first `steps` optimizer steps of `recipe`."""
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
    return [r["seconds"] for r in records if "seconds" in r]


def planned_steps(elapsed: Sequence[float], seconds: float) -> int:
    """Steps that fill `seconds`, from a probe's clock at each step (`elapsed[i]`: after step i+1).

    A run starts slow (data workers, first batches: 1.5 s a step for ten steps, then 0.3 s, on
    the native path here) and every run repeats that start. So the plan is the probe's own steps,
    then the rest of the budget at the probe's steady step: the median of its second half."""
    k = len(elapsed)
    if k < 2 or seconds <= elapsed[-1]:
        return max(1, int(seconds * k / max(elapsed[-1], 1e-9)))
    deltas = sorted(b - a for a, b in zip(elapsed[k // 2 - 1:], elapsed[k // 2:]))
    steady = max(deltas[len(deltas) // 2], 1e-9)
    return k + int((seconds - elapsed[-1]) / steady)


def train_for(recipe: dict, seconds: float, calibration_steps: int) -> dict[str, Any]:
    """Run `recipe` for `seconds` of training loop: steps planned from a timed probe (`planned_steps`),
    capped by time."""
    from seechat.inference.evaluate import evaluate_file
    from seechat.training.loop import run

    elapsed = _probe_seconds(recipe, calibration_steps, Path(recipe["output_dir"] + "-calibration"))
    steps = planned_steps(elapsed, seconds)
    recipe = copy.deepcopy(recipe)
    recipe["train"].update(max_steps=steps, max_seconds=seconds, trackers=[], save_every=None)
    summary = run(recipe, evaluate=evaluate_file)
    return {**summary, "calibrated_step_seconds": seconds / steps, "planned_steps": steps}


def _common_overrides(cfg: dict, data: Path, name: str, stage: str, seed: int) -> list[str]:
    return [f"seed={seed}", f"output_dir={Path(cfg['output_dir']) / f'seed{seed}' / name / stage}",
            f"data.train={data / 'train_balanced.json'}", f"data.val={data / 'val.json'}",
            f"data.test={data / 'test.json'}", f"data.image_root={data}", *cfg["overrides"]]


def train_stitched(cfg: dict, name: str, spec: dict, experts: Path, data: Path, seed: int) -> list[dict]:
    """The demo's align then finetune recipes with this path's adapter, budget split between them."""
    from seechat.config import load_recipe
    from seechat.experiments.easyvqa.pipeline import ALIGN_RECIPE, FINETUNE_RECIPE

    experts_keys = [f"model.encoder.name={experts / 'vision'}", f"llm.name_or_path={experts / 'llm'}"]
    budget, share = cfg["budget_seconds"], cfg["align_fraction"]
    align = load_recipe(ALIGN_RECIPE, [*_common_overrides(cfg, data, name, "align", seed), *experts_keys,
                                       *spec["overrides"]])
    first = train_for(align, budget * share, cfg["calibration_steps"])
    finetune = load_recipe(FINETUNE_RECIPE, [*_common_overrides(cfg, data, name, "finetune", seed), *experts_keys,
                                             *spec["overrides"], f"model.init_from={first['final']}"])
    return [first, train_for(finetune, budget * (1 - share), cfg["calibration_steps"])]


def prepare_native_inputs(cfg: dict, data: Path, experts: Path) -> dict:
    """The VQ tokenizer and the native training file (seechat.experiments.native_prepare), made
    once and shared by every native path and seed, like the stitched paths' experts."""
    from seechat.experiments.native_prepare import prepare_native

    native = cfg["native"]
    return prepare_native(data, Path(cfg["output_dir"]) / "native_prepare", vq_epochs=native["vq_epochs"],
                          vq_config=native["vq_config"], seed=cfg["seeds"][0],
                          vq_max_seconds=native.get("vq_max_seconds"), draw_repeats=native.get("draw_repeats", 1),
                          image_only=native.get("image_only", False),
                          questions_per_sample=native.get("questions_per_sample", 1),
                          semantic_tower=experts / "vision")  # read only with vq_config.semantic_tokens


def train_native(cfg: dict, name: str, spec: dict, experts: Path, data: Path, seed: int, prep: dict) -> list[dict]:
    """The native recipe on the budget, grown from the experts' text LM unless the path's
    overrides say `model.native.init_from=null` (from scratch)."""
    from seechat.config import load_recipe

    recipe = load_recipe(NATIVE_RECIPE, [*_common_overrides(cfg, data, name, "train", seed), f"data.train={prep['train']}",
                                         f"model.native.vq={prep['vq']}", f"llm.tokenizer={experts / 'tokenizer'}",
                                         f"model.native.init_from={experts / 'llm'}", *spec["overrides"]])
    return [train_for(recipe, cfg["budget_seconds"], cfg["calibration_steps"])]


def starts_from(spec: dict, model_cfg: dict, semantic_tokens: int = 0) -> str:
    """What a path's training starts from, for the table (`semantic_tokens`: the native VQ's,
    read off the stitched paths' vision tower)."""
    if spec["kind"] == "native":
        tower = f"vision tower ({semantic_tokens} semantic codes)" if semantic_tokens else ""
        if model_cfg["native"].get("init_from"):
            grown = f"{tower} + text LM" if tower else "the text LM"
            grown += ", vocabulary grown by the VQ codes"
            grown += ", code rows along the codebook" if model_cfg["native"].get("code_init_share") else ""
            return grown + (", code rows toward their words" if model_cfg["native"].get("code_word_share") else "")
        return (f"{tower}; " if tower else "nothing: ") + "LM from scratch (VQ codes + text)"
    return "vision tower + text LM; adapter from scratch"


# ---------------------------------------------------------------------- evaluation
def evaluate_path(final: str, data: Path, out: Path, eval_samples: int | None) -> tuple[Any, dict]:
    from seechat.experiments.easyvqa.pipeline import question_type
    from seechat.inference.evaluate import evaluate_file
    from seechat.models.kinds import load

    model = load(final)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / "predictions.jsonl"
    result = evaluate_file(model, str(data / "test.json"), image_root=str(data), max_samples=eval_samples,
                           batch_size=128, max_new_tokens=4, predictions_path=predictions)
    result["eval_seconds"] = time.time() - start
    by_type: dict[str, list[int]] = {}
    for row in map(json.loads, predictions.read_text().splitlines()):
        by_type.setdefault(question_type(row), []).append(row["correct"])
    result["accuracy_by_type"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    return model, result


def _run_row(name: str, spec: dict, seed: int, model: Any, stages: list[dict], result: dict) -> dict[str, Any]:
    steps = sum(s["steps"] for s in stages)
    loop = sum(s["loop_seconds"] for s in stages)
    adapter = model.config.get("adapter") or {}
    return {
        "path": name, "seed": seed, "kind": spec["kind"], "adapter": adapter.get("type", "none (early fusion)"),
        "starts_from": starts_from(spec, model.config, getattr(getattr(model, "vq", None), "semantic_tokens", 0)),
        # positions an image takes in the LM's sequence (native: codes + <im_start>/<im_end>)
        "image_tokens": getattr(model, "positions_per_image", model.num_image_tokens),
        "trained_parameters": max(s["trainable_parameters"] for s in stages),
        "steps": steps, "step_seconds": loop / max(steps, 1), "train_seconds": loop,
        "final": stages[-1]["final"],
        "stages": [{k: s[k] for k in ("steps", "planned_steps", "loop_seconds", "calibrated_step_seconds",
                                      "stopped_by_max_seconds", "loss", "samples_per_s", "trainable_parameters")}
                   for s in stages],
        **{k: result[k] for k in ("accuracy", "correct", "n", "eval_seconds", "accuracy_by_type")},
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, median, min, max and the values themselves (one per seed)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"mean": sum(values) / len(values), "median": median, "min": ordered[0], "max": ordered[-1],
            "values": list(values)}


def aggregate(runs: list[dict]) -> dict[str, Any]:
    """One table row per path from its runs (one per seed)."""
    first = runs[0]
    row = {k: first[k] for k in ("path", "kind", "adapter", "starts_from", "image_tokens", "trained_parameters", "n")}
    row.update(seeds=[r["seed"] for r in runs], accuracy=spread([r["accuracy"] for r in runs]),
               steps=spread([r["steps"] for r in runs]), step_seconds=spread([r["step_seconds"] for r in runs]),
               train_seconds=spread([r["train_seconds"] for r in runs]))
    drawn = [r["drawn"] for r in runs if "drawn" in r]
    if drawn:
        row["drawn"] = {k: spread([d[k] for d in drawn]) for k in ("color", "shape", "both")}
    return row


def main_run(cfg: dict) -> dict[str, Any]:
    """Train and evaluate every path for every seed, judge the native drawings, write the results."""
    from seechat.experiments.compare_report import judge_drawings, judge_reconstructions, write_results
    from seechat.experiments.native_prepare import DRAW_PROMPT

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
    natives = [n for n, s in cfg["paths"].items() if s["kind"] == "native"]
    prep = prepare_native_inputs(cfg, data, experts) if natives else None
    runs: list[dict] = []
    for seed in cfg["seeds"]:
        finals = {}
        for name, spec in cfg["paths"].items():
            logger.info("compare: seed %d, training %s (%s) for %.0fs", seed, name, spec["kind"], cfg["budget_seconds"])
            stages = (train_native(cfg, name, spec, experts, data, seed, prep) if spec["kind"] == "native"
                      else train_stitched(cfg, name, spec, experts, data, seed))
            model, result = evaluate_path(stages[-1]["final"], data, out / f"seed{seed}" / name, cfg["eval_samples"])
            runs.append(_run_row(name, spec, seed, model, stages, result))
            finals[name] = stages[-1]["final"]
            logger.info("compare: seed %d, %s accuracy %.4f", seed, name, result["accuracy"])
        judge = finals[cfg["generation"]["judge"]]
        for name in natives:
            run = next(r for r in runs if r["path"] == name and r["seed"] == seed)
            run["drawn"] = judge_drawings(finals[name], judge, out / f"seed{seed}" / name / "drawn",
                                          cfg["generation"], seed)
    extra: dict[str, Any] = {}
    if prep is not None:
        extra.update(vq=prep["vq_metrics"], native_mix=prep["mix"])
        first = next(r for r in runs if r["path"] == cfg["generation"]["judge"])
        extra["vq_judged"] = judge_reconstructions(prep["vq"], first["final"], data, out / "reconstructed",
                                                   cfg["generation"]["reconstructions"], cfg["seeds"][0])
    rows = {name: aggregate([r for r in runs if r["path"] == name]) for name in cfg["paths"]}
    results = {"config": cfg, "rows": rows, "runs": runs, **extra,
               "generation": {"prompt": DRAW_PROMPT, **cfg["generation"]},
               "total_seconds": time.time() - start,
               "machine": host()}
    write_results(results, Path(cfg["results_dir"]))
    return results
