"""The non-finite guard: a step whose loss (and so gradient) is NaN/inf is not applied and is
counted; too many in a row stop the run with a clear message and a loadable checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from seechat.training.guard import NonFiniteError
from seechat.models.stitched.model import StitchedVLM
from seechat.training.loop import run


def poison(monkeypatch, bad_calls: set[int] | None, from_call: int | None = None) -> list[dict]:
    """Make StitchedVLM's loss NaN on the chosen forward calls (1-based); returns snapshots of the
    adapter's weights taken at the start of every call, i.e. after the previous update."""
    forward = StitchedVLM.forward
    snapshots: list[dict] = []

    def poisoned(self, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in self.adapter.state_dict().items()})
        out = forward(self, *args, **kwargs)
        call = len(snapshots)
        if (bad_calls and call in bad_calls) or (from_call and call >= from_call):
            out.loss = out.loss * float("nan")  # NaN loss, and NaN gradients through it
        return out

    monkeypatch.setattr(StitchedVLM, "forward", poisoned)
    return snapshots


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_and_counted(experts, tiny_vqa, tmp_path, monkeypatch):
    snapshots = poison(monkeypatch, bad_calls={3, 5})
    summary = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "train.max_steps=6"))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 2 and math.isfinite(summary["loss"])
    assert len(snapshots) == 6
    # snapshots[k] holds the weights after step k; steps 3 and 5 changed nothing, the others did.
    for step in range(1, 6):
        assert same(snapshots[step - 1], snapshots[step]) == (step in (3, 5)), step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [math.isnan(r["loss"]) for r in rows] == [False, False, True, False, True, False]
    assert [r.get("nonfinite_steps", 0) for r in rows] == [0, 0, 1, 1, 2, 2]


def test_nonfinite_steps_in_a_row_stop_with_a_checkpoint(experts, tiny_vqa, tmp_path, monkeypatch):
    snapshots = poison(monkeypatch, bad_calls=None, from_call=3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"NaN/inf for 4 steps in a row \(steps 3-6; "
                       r"train.max_nonfinite_steps=4\).*checkpoint-6"):
        run(tiny_recipe(experts, tiny_vqa, str(out), "train.max_steps=20", "train.max_nonfinite_steps=4"))
    assert len(snapshots) == 6  # stopped at step 6, not 20
    saved = load_file(out / "checkpoint-6" / "model.safetensors")
    adapter = {k.removeprefix("adapter."): v for k, v in saved.items() if k.startswith("adapter.")}
    # The checkpoint holds the weights of step 2, the last finite one.
    assert adapter.keys() == snapshots[2].keys() and same(adapter, snapshots[2])
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["nonfinite_steps"] == 4
    assert (out / "latest").read_text() == "checkpoint-6" and not (out / "final").exists()
