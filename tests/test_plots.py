"""Pictures and logs: training curves as PNG next to the TensorBoard logs; `seechat eval`
writes predictions.jsonl and summary.json."""
from __future__ import annotations

import json

from PIL import Image

from conftest import tiny_recipe
from seechat.cli import main
from seechat.training.plots import plot_curves, read_metrics


def test_curves_from_metrics_with_resume_duplicates_and_a_torn_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 3.0 - 0.2 * s, "lr": 1e-3 * s / 6}) for s in range(1, 7)]
    # resumed from step 4: steps 5 and 6 logged again (later values win), then a kill mid-write
    lines += [json.dumps({"step": 5, "loss": 1.5, "lr": 5e-4}), json.dumps({"step": 6, "loss": 1.0, "lr": 6e-4}),
              '{"step": 7, "lo']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] == 1.0 and records[4]["lr"] == 5e-4
    written = plot_curves(run / "metrics.jsonl", run / "logs")
    assert [p.name for p in written] == ["loss.png", "lr.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (600, 350)
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 10  # a drawn plot, not a blank
    (run / "empty.jsonl").write_text("")
    assert plot_curves(run / "empty.jsonl", run / "none") == [] and not (run / "none").exists()


def test_training_run_writes_curves_and_eval_writes_files(experts, tiny_vqa, tmp_path, capsys):
    from seechat.training.loop import run

    out = tmp_path / "run"
    summary = run(tiny_recipe(experts, tiny_vqa, str(out), "train.max_steps=4"))
    for name in ("loss.png", "lr.png"):
        with Image.open(out / "logs" / name) as image:
            assert image.format == "PNG"
    assert len(read_metrics(out / "metrics.jsonl")) == 4

    model_dir = summary["final"]
    assert main(["eval", "--model", model_dir, "--data", tiny_vqa["test"], "--image-root", tiny_vqa["root"],
                 "--max-samples", "6", "--batch-size", "4", "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    eval_dir = out / "final-eval" / "test"  # beside the model: saving it again replaces its directory
    assert lines[-1] == f"summary: {eval_dir / 'summary.json'}"
    printed = json.loads((eval_dir / "summary.json").read_text())
    assert f"accuracy {printed['accuracy']:.2%} ({printed['correct']}/6) on {tiny_vqa['test']}" in lines
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    saved = printed
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)]
    assert saved["n"] == 6 and saved["correct"] == sum(r["correct"] for r in rows)
    assert saved["accuracy"] == saved["correct"] / 6
    assert saved["data"] == tiny_vqa["test"] and saved["model"] == model_dir
    assert saved["settings"]["max_new_tokens"] == 3
