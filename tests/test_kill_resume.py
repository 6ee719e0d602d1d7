"""Kill and resume: a training process killed with SIGKILL at a random step resumes to the same
weights, bit for bit, as a run that was never interrupted; a save killed midway leaves the
previous checkpoint in charge; old checkpoints are pruned and the `latest` pointer is never
half-written. (tests/test_train.py keeps the in-process variant using train.stop_after.)"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import tiny_recipe
from seechat.training import checkpoint
from seechat.training.loop import run

# LoRA (with dropout, so the RNG state matters), grad accumulation and a shuffled order.
COMMON = ["stage=finetune", "llm.mode=lora", "train.grad_accum=2", "train.batch_size=3", "train.save_every=3"]

RUNNER = """
import sys, time
from seechat.config import load_recipe
from seechat.models.stitched.model import StitchedVLM
from seechat.training.loop import run

recipe_path, resume, delay = sys.argv[1], sys.argv[2] == "resume", float(sys.argv[3])
if delay:  # slow each forward down so the test can kill the run at the step it picked
    forward = StitchedVLM.forward
    def slow(self, *args, **kwargs):
        time.sleep(delay)
        return forward(self, *args, **kwargs)
    StitchedVLM.forward = slow
run(load_recipe(recipe_path, sys.argv[4:]), resume=resume)
"""


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    weights = load_file(out / "final" / "adapter.safetensors")
    lora = load_file(out / "final" / "llm_lora" / "adapter_model.safetensors")
    return {**weights, **{f"lora.{k}": v for k, v in lora.items()}}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def metrics(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run's lines replace the killed run's lines for the same step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def launch(tmp_path: Path, out: Path, *extra: str, resume: bool = False, delay: float = 0.0) -> subprocess.Popen:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    # One thread, like every other run of the test: bit-equality needs the same reduction order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(runner), f"{out}.recipe.yaml", "resume" if resume else "fresh", str(delay), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(experts, tiny_vqa, tmp_path):
    steps = 16
    extra = [*COMMON, f"train.max_steps={steps}"]  # (the written recipe holds no overrides)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    tiny_recipe(experts, tiny_vqa, str(reference))  # writes <out>.recipe.yaml
    tiny_recipe(experts, tiny_vqa, str(killed))
    finish(launch(tmp_path, reference, *extra))

    target = random.SystemRandom().randint(4, steps - 3)  # after the first checkpoint (step 3)
    proc = launch(tmp_path, killed, *extra, delay=0.15)
    deadline = time.time() + 300
    while steps_logged(killed) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = steps_logged(killed)
    assert proc.returncode == -signal.SIGKILL and reached < steps, f"target {target}, reached {reached}"
    assert not (killed / "final").exists()
    resumed_from = checkpoint.latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) <= reached

    finish(launch(tmp_path, killed, *extra, resume=True))
    assert_bit_equal(final_weights(killed), final_weights(reference))
    # The same batches in the same order with the same dropout: every step's loss matches.
    assert metrics(killed) == metrics(reference), f"killed at step {reached} (target {target})"


def test_save_killed_midway_leaves_the_previous_checkpoint(experts, tiny_vqa, tmp_path, monkeypatch):
    extra = ["train.max_steps=8"]
    full = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "a"), *COMMON, *extra))
    out = tmp_path / "b"
    save_state = Accelerator.save_state
    calls = []

    def dies_in_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = save_state(self, output_dir, **kwargs)
        if len(calls) == 2:
            # As if killed after accelerate wrote the model and optimizer, before the state file
            # and the rename: the optimizer file is cut short too.
            optimizer_file = Path(output_dir) / "optimizer.bin"
            optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
            raise KeyboardInterrupt("simulated kill during the save of step 6")
        return result

    monkeypatch.setattr(Accelerator, "save_state", dies_in_second_save)
    with pytest.raises(KeyboardInterrupt, match="step 6"):
        run(tiny_recipe(experts, tiny_vqa, str(out), *COMMON, *extra))
    monkeypatch.undo()
    assert (out / ".tmp-checkpoint-6").is_dir() and not (out / "checkpoint-6").exists()
    assert (out / "latest").read_text() == "checkpoint-3"
    assert checkpoint.latest_checkpoint(out) == out / "checkpoint-3"

    resumed = run(tiny_recipe(experts, tiny_vqa, str(out), *COMMON, *extra), resume=True)
    assert resumed["steps"] == full["steps"] == 8
    assert not list(out.glob(".tmp-*"))  # the interrupted save was cleaned up
    assert_bit_equal(final_weights(out), final_weights(tmp_path / "a"))


def test_keeps_the_last_k_and_points_at_the_newest(experts, tiny_vqa, tmp_path):
    out = tmp_path / "run"
    run(tiny_recipe(experts, tiny_vqa, str(out), "train.max_steps=5", "train.save_every=1",
                    "train.save_total_limit=2"))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]
    assert (out / "latest").read_text() == "checkpoint-5"
    state = json.loads((out / "checkpoint-5" / checkpoint.STATE).read_text())
    assert state["step"] == 5 and state["nonfinite_steps"] == 0


def test_latest_pointer_falls_back_and_is_replaced_atomically(tmp_path, monkeypatch):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / checkpoint.STATE).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # no state file: incomplete (written by an old version)
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    checkpoint.write_atomic(tmp_path / "latest", "checkpoint-2")
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    (tmp_path / "latest").write_text("checkpoint-9")  # names a checkpoint that is gone
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    checkpoint.write_atomic(tmp_path / "latest", "checkpoint-2")
    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic(tmp_path / "latest", "checkpoint-4")
    assert (tmp_path / "latest").read_text() == "checkpoint-2"  # the old pointer, whole
