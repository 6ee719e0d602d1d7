"""Multi-process training on accelerate: `accelerate launch --multi_gpu --num_processes 2` on
this CPU-only machine runs two gloo processes (seechat passes cpu=True to accelerate when torch
sees no GPU) and matches a one-process run with the same global batch; checkpoints and the
final model are written once, by the main process. The shipped accelerate configs parse."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from seechat.config import REPO_ROOT

CONFIGS = REPO_ROOT / "recipes" / "accelerate"
COMMON = ["train.max_steps=5", "train.save_every=2", "train.lr=1e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def train(out: Path, launcher: list[str], *extra: str) -> None:
    cmd = [*launcher, str(REPO_ROOT / "recipes" / "align.py"), "--config", f"{out}.recipe.yaml", *COMMON, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process(experts, tiny_vqa, tmp_path):
    from seechat.data.from_recipe import build_dataset
    from seechat.training.loop import model_for

    # The halves of a global batch hold different numbers of supervised tokens: each process
    # weights its loss by its share of the global count, so the gradient is still the mean over
    # every supervised token, as in one process.
    recipe = tiny_recipe(experts, tiny_vqa, str(tmp_path / "probe"))
    dataset = build_dataset(recipe, model_for(recipe))
    counts = [int((dataset[i]["labels"] != -100).sum()) for i in range(len(dataset))]
    assert len(set(counts)) > 1, "the test needs samples with different answer lengths"
    records = json.loads(Path(tiny_vqa["train"]).read_text())
    kept = records[: len(records) // 4 * 4]
    assert len(kept) >= 8
    (tmp_path / "mixed.json").write_text(json.dumps(kept))
    data = {**tiny_vqa, "train": str(tmp_path / "mixed.json")}
    one, two = tmp_path / "one", tmp_path / "two"
    tiny_recipe(experts, data, str(one))  # writes <out>.recipe.yaml
    tiny_recipe(experts, data, str(two))

    train(one, [sys.executable], "train.batch_size=4")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--mixed_precision", "no"]
    train(two, launch, "train.batch_size=2")  # 2 processes x 2 = the same global batch of 4

    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 5 and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa, wb = load_file(one / "final" / "adapter.safetensors"), load_file(two / "final" / "adapter.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # Really two processes: each saved its own RNG state into the checkpoint, once.
    ckpt = sorted(p.name for p in (two / "checkpoint-4").iterdir())
    assert [n for n in ckpt if n.startswith("random_states")] == ["random_states_0.pkl", "random_states_1.pkl"]
    assert [n for n in ckpt if n.startswith("random_states")] != sorted(
        p.name for p in (one / "checkpoint-4").iterdir() if p.name.startswith("random_states"))
    assert (two / "latest").read_text() == "checkpoint-4" and not list(two.glob(".tmp-*"))
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 5  # written by the main process only


@pytest.mark.slow
def test_a_process_whose_batch_is_all_skipped_does_not_stall_the_others(experts, tiny_vqa, tmp_path):
    # Batch 1 per process: whichever process draws the unreadable sample has nothing to train
    # on at that step while the other has a sample. The collectives are per step, so the first
    # goes on to its next batch and both still run the same 4 steps.
    records = json.loads(Path(tiny_vqa["train"]).read_text())[:6]
    records[2] = {**records[2], "id": "broken", "image": "images/missing.png"}
    (tmp_path / "bad.json").write_text(json.dumps(records))
    out = tmp_path / "two"
    tiny_recipe(experts, {**tiny_vqa, "train": str(tmp_path / "bad.json")}, str(out))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--mixed_precision", "no"]
    cmd = [*launch, str(REPO_ROOT / "recipes" / "align.py"), "--config", f"{out}.recipe.yaml",
           "train.max_steps=4", "train.batch_size=1", "data.on_error=skip"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)  # a stall ends here
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(losses(out)) == 4 and (out / "final").is_dir()
    assert "skipped samples: 1" in proc.stdout


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("cpu2", "MULTI_GPU"), ("fsdp", "FSDP"),
                                        ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(config.distributed_type).split(".")[-1] == kind
    if kind == "DEEPSPEED":
        stage = int(name[-1])
        assert config.deepspeed_config["zero_stage"] == stage
        if stage == 3:
            # Frozen experts are loaded whole by every process before accelerate shards them,
            # and saved gathered into one file, not as ZeRO shards (seechat saves safetensors).
            assert config.deepspeed_config["zero3_init_flag"] is False
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False


def test_fsdp_request_on_cpu_is_refused_not_downgraded(experts, tiny_vqa, tmp_path, monkeypatch):
    """accelerate chooses FSDP only for GPU-like devices; with `--config_file fsdp.yaml` on this
    CPU it would set up plain DDP. seechat stops instead of training something else."""
    from seechat.training.loop import run

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asked for FSDP but accelerate set up NO on cpu: accelerate runs FSDP on GPUs"):
        run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "train.max_steps=1"))
