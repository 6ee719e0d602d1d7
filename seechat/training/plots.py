"""Training curves as pictures: loss and learning rate per step, read from a run's
`metrics.jsonl` and written as PNG next to its TensorBoard logs (`<run>/logs/`).

matplotlib's object API with the Agg canvas draws without a display and without switching the
process-wide pyplot backend.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

CURVES = {"loss": ("training loss", "loss.png"), "lr": ("learning rate", "lr.png"),
          "val/accuracy": ("validation accuracy (data.val)", "val_accuracy.png")}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of `metrics.jsonl`, one per step, in step order. Records of the same step
    are merged (a step's training record and its `val/...` record become one); a resumed run
    re-logs the steps after its checkpoint, and the later values win. Unreadable lines (a run
    killed mid-write) are skipped with a warning naming the line."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_step.setdefault(int(record["step"]), {}).update(record)
            except (ValueError, KeyError, TypeError) as err:
                logger.warning("%s:%d: skipped unreadable metrics line (%s)", path, number, err)
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write `loss.png` and `lr.png` to `out_dir` from `metrics_path`; returns the files written
    (none when there are no records)."""
    records = read_metrics(metrics_path)
    out = Path(out_dir)
    written = []
    for key, (label, name) in CURVES.items():
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        out.mkdir(parents=True, exist_ok=True)
        figure = Figure(figsize=(6, 3.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        steps, values = zip(*points)
        axes.plot(steps, values, marker="." if len(points) < 50 else None)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(label)
        if key == "loss" and min(values) > 0 and max(values) > 10 * min(values):
            axes.set_yscale("log")  # late-training loss is orders of magnitude below the start
        if key == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axes.set_title(f"{label} ({Path(metrics_path).parent.name})")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / name)
        written.append(out / name)
    return written


if __name__ == "__main__":  # python -m seechat.training.plots RUN_DIR/metrics.jsonl OUT_DIR
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m seechat.training.plots METRICS_JSONL OUT_DIR")
    for written_path in plot_curves(sys.argv[1], sys.argv[2]):
        print(written_path)
