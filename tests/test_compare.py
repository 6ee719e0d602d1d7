"""The comparison's parts: config validation, the wall-clock budget in the training loop, a
budgeted stage (calibrated steps), and the result files (JSON, markdown table, PNG plot)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import tiny_recipe
from seechat.experiments.compare import load_compare_config, train_for
from seechat.experiments.compare_report import markdown, write_results
from seechat.config import RecipeError
from seechat.training.loop import run


def test_compare_config_defaults_and_errors():
    cfg = load_compare_config(None, ["budget_seconds=30", "paths.native.overrides=[train.lr=1e-3]"])
    assert cfg["budget_seconds"] == 30 and list(cfg["paths"]) == ["mlp", "qformer", "resampler", "native"]
    assert cfg["paths"]["native"]["overrides"] == ["train.lr=1e-3"]
    with pytest.raises(RecipeError, match="unknown compare key.*budget_second"):
        load_compare_config(None, ["budget_second=30"])
    with pytest.raises(RecipeError, match="path 'mlp': kind must be stitched or native"):
        load_compare_config(None, ["paths.mlp.kind=early"])
    with pytest.raises(RecipeError, match="generation.judge='clip'"):
        load_compare_config(None, ["generation.judge=clip"])


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
    assert summary["planned_steps"] == max(1, int(3.0 / summary["calibrated_step_seconds"]))
    assert summary["steps"] <= summary["planned_steps"]
    assert summary["loop_seconds"] < 3.0 + 5
    assert not (tmp_path / "run-calibration").exists()  # the probe run is cleaned up


def test_result_files(tmp_path):
    row = {"path": "mlp", "kind": "stitched", "adapter": "mlp", "image_tokens": 17, "trained_parameters": 2_500_000,
           "steps": 100, "step_seconds": 0.25, "train_seconds": 25.0, "accuracy": 0.9, "correct": 9, "n": 10}
    results = {"config": {"budget_seconds": 25, "align_fraction": 0.33, "generation": {"judge": "mlp"}},
               "rows": {"mlp": row, "native": {**row, "path": "native", "adapter": "none (early fusion)",
                                               "image_tokens": 66, "accuracy": 0.5, "correct": 5}},
               "total_seconds": 60.0, "machine": {"cpus": 2},
               "generation": {"prompt": "draw a {color} {shape}", "temperature": 1.0,
                              "drawn": {"images": 24, "color": 0.5, "shape": 0.25, "both": 0.125}}}
    write_results(results, tmp_path)
    table = (tmp_path / "compare.md").read_text()
    assert "| mlp (mlp) | 90.0% (9/10) | 17 | 2.50 M | 100 | 250 | 25 |" in table
    assert "| native (none (early fusion)) | 50.0% (5/10) | 66 |" in table
    assert "color 50%, shape 25%, both 12%" in table
    assert json.loads((tmp_path / "compare.json").read_text())["rows"]["native"]["image_tokens"] == 66
    with Image.open(tmp_path / "compare.png") as image:
        assert image.size[0] > 300
    assert markdown(results) == table
