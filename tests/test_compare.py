"""The comparison's parts: config validation, the wall-clock budget in the training loop, a
budgeted stage (calibrated steps), and the result files (JSON, markdown table, PNG plot)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import tiny_recipe
from seechat.experiments.compare import aggregate, load_compare_config, train_for
from seechat.experiments.compare_report import markdown, write_results
from seechat.config import RecipeError
from seechat.training.loop import run


def test_compare_config_defaults_and_errors():
    cfg = load_compare_config(None, ["budget_seconds=30", "paths.native.overrides=[train.lr=1e-3]"])
    assert cfg["budget_seconds"] == 30 and cfg["seeds"] == [0, 1, 2]
    assert list(cfg["paths"]) == ["mlp", "qformer", "resampler", "native", "native_stats", "native_scratch"]
    assert cfg["native"]["vq_config"]["semantic_tokens"] == 2
    assert cfg["paths"]["native"]["overrides"] == ["train.lr=1e-3"]
    assert "model.native.init_from=null" in cfg["paths"]["native_scratch"]["overrides"]
    quick = load_compare_config(None, ["eval_samples=5"], quick=True)
    assert quick["seeds"] == [0] and quick["budget_seconds"] == 2 and quick["eval_samples"] == 5
    assert quick["output_dir"].endswith("runs/compare_quick") and "train.batch_size=8" in quick["overrides"]
    with pytest.raises(RecipeError, match="unknown compare key.*budget_second"):
        load_compare_config(None, ["budget_second=30"])
    with pytest.raises(RecipeError, match="path 'mlp': kind must be stitched or native"):
        load_compare_config(None, ["paths.mlp.kind=early"])
    with pytest.raises(RecipeError, match="generation.judge='clip'"):
        load_compare_config(None, ["generation.judge=clip"])
    with pytest.raises(RecipeError, match=r"seeds=3: give a non-empty list of integers"):
        load_compare_config(None, ["seeds=3"])
    with pytest.raises(RecipeError, match=r"native.questions_per_sample=0; give an integer >= 1"):
        load_compare_config(None, ["native.questions_per_sample=0"])


def test_max_seconds_stops_the_loop_and_saves_final(experts, tiny_vqa, tmp_path):
    out = tmp_path / "run"
    summary = run(tiny_recipe(experts, tiny_vqa, str(out), "train.max_steps=100000", "train.max_seconds=1.5"))
    assert summary["stopped_by_max_seconds"] and summary["steps"] < 100000
    assert 1.5 <= summary["loop_seconds"] < 1.5 + 5  # stops at the first step past the budget
    assert (out / "final" / "seechat.json").is_file()
    assert summary["trainable_parameters"] > 0


def test_train_for_sizes_steps_to_the_budget(experts, tiny_vqa, tmp_path):
    recipe = tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"))
    summary = train_for(recipe, seconds=3.0, calibration_steps=3)
    assert summary["calibrated_step_seconds"] == 3.0 / summary["planned_steps"]
    assert summary["steps"] <= summary["planned_steps"]
    assert summary["loop_seconds"] < 3.0 + 5
    assert not (tmp_path / "run-calibration").exists()  # the probe run is cleaned up


def test_planned_steps_count_the_slow_start_once_then_the_steady_step():
    from seechat.experiments.compare import planned_steps

    # 4 slow steps (1.5 s), then 0.25 s: 7 s after 8 steps, and the second half's median is 0.25 s
    elapsed = [1.5, 3.0, 4.5, 6.0, 6.25, 6.5, 6.75, 7.0]
    assert planned_steps(elapsed, 30.0) == 8 + 92  # (30 - 7) / 0.25 more; 30 s / the mean step would give 34
    assert planned_steps(elapsed, 3.5) == 4  # a budget inside the probe: the probe's own mean step
    assert planned_steps([2.0], 10.0) == 5 and planned_steps([0.5, 1.0], 0.1) == 1


def test_result_files(tmp_path):
    def run(path, seed, accuracy, **extra):
        return {"path": path, "seed": seed, "kind": "stitched", "adapter": "mlp", "image_tokens": 17,
                "starts_from": "vision tower + text LM; adapter from scratch", "trained_parameters": 2_500_000,
                "steps": 100, "step_seconds": 0.25 + seed / 100, "train_seconds": 25.0, "accuracy": accuracy,
                "correct": int(10 * accuracy), "n": 10, **extra}

    mlp = [run("mlp", s, a) for s, a in ((0, 0.9), (1, 0.8), (2, 1.0))]
    native = [run("native", s, a, adapter="none (early fusion)", image_tokens=66, kind="native",
                  starts_from="the text LM, vocabulary grown by the VQ codes",
                  drawn={"images": 24, "color": c, "shape": 0.25, "both": 0.125})
              for s, a, c in ((0, 0.5, 0.5), (1, 0.6, 0.75), (2, 0.4, 1.0))]
    rows = {"mlp": aggregate(mlp), "native": aggregate(native)}
    assert rows["mlp"]["accuracy"] == {"mean": pytest.approx(0.9), "median": 0.9, "min": 0.8, "max": 1.0,
                                       "values": [0.9, 0.8, 1.0]}
    assert rows["native"]["drawn"]["color"]["values"] == [0.5, 0.75, 1.0] and "drawn" not in rows["mlp"]
    results = {"config": {"budget_seconds": 25, "align_fraction": 0.33, "seeds": [0, 1, 2], "generation": {"judge": "mlp"}},
               "rows": rows, "runs": mlp + native, "total_seconds": 60.0, "machine": {"cpus": 2},
               "generation": {"prompt": "draw a {color} {shape}", "per_prompt": 1, "temperature": 1.0, "top_k": 100,
                              "cfg_scale": 3.0},
               "vq_judged": {"originals": {"images": 8, "color": 1.0, "shape": 1.0, "both": 1.0},
                             "reconstructions": {"images": 8, "color": 1.0, "shape": 0.5, "both": 0.5}}}
    write_results(results, tmp_path)
    table = (tmp_path / "compare.md").read_text()
    assert ("| mlp (mlp) | vision tower + text LM; adapter from scratch | 90.0 (80.0-100.0) | 3 | 17 | 2.50 M "
            "| 260 (250-270) | 25 (25-25) | - |") in table
    assert "| native (none (early fusion)) | the text LM, vocabulary grown by the VQ codes | 50.0 (40.0-60.0) | 3 | 66 |" in table
    assert "| 75 (50-100) / 25 (25-25) / 12 (12-12) |" in table
    assert "guidance 3.0" in table and "50% on their VQ reconstructions" in table
    assert json.loads((tmp_path / "compare.json").read_text())["rows"]["native"]["image_tokens"] == 66
    with Image.open(tmp_path / "compare.png") as image:
        assert image.size[0] > 300
    assert markdown(results) == table
    assert "whole run 60 s on 2 CPUs." in table  # an older result: the CPU count only
    results["machine"] = {"cpus": 2, "cpu": "AMD EPYC", "mixed_precision_auto": "bf16"}
    assert "whole run 60 s on 2 CPUs (AMD EPYC, bf16 autocast)." in markdown(results)
