"""Where a run stands - optimizer step, epoch, batches read in the epoch, samples skipped,
non-finite steps - and how that position is saved into a checkpoint and read back on resume.

The position is stored as `trainer_state.json` beside accelerate's own state (model,
optimizer, scheduler, RNG) in `checkpoint-<step>/`; seechat/training/checkpoint.py writes both
atomically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from seechat.training.checkpoint import STATE, latest_checkpoint, remove_stale, save_checkpoint


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch already read (by this process)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample, reason), every encounter
    nonfinite_steps: int = 0

    def to_json(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_done,
                "skipped": self.skipped, "nonfinite_steps": self.nonfinite_steps}

    @classmethod
    def from_json(cls, state: dict) -> TrainState:
        return cls(state["step"], state["epoch"], state["batches_in_epoch"],
                   [tuple(s) for s in state["skipped"]], state.get("nonfinite_steps", 0))


def resume_state(
    accelerator: Accelerator, out: Path, resume: bool, skipped: list[tuple[str, str]]
) -> tuple[TrainState, torch.Tensor | None]:
    """A fresh state (with the samples the reader `skipped`), or with `resume` the latest
    checkpoint's, loaded into the prepared objects. The second value is the global RNG state to
    re-apply after the first resumed batch (None on a fresh start)."""
    if resume and accelerator.is_main_process:
        remove_stale(out)  # temp directories of a save that was killed
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is None:
        return TrainState(skipped=list(skipped)), None
    accelerator.load_state(str(checkpoint))
    state = TrainState.from_json(json.loads((checkpoint / STATE).read_text()))
    accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    # Starting a DataLoader iterator draws from the global RNG; the uninterrupted run drew at
    # epoch start, before the checkpoint. Re-apply the checkpoint's RNG state once the resumed
    # iterator has produced its first batch, so dropout masks stay identical.
    return state, torch.get_rng_state()


def save_state(accelerator: Accelerator, out: Path, state: TrainState, keep: int) -> Path:
    """`checkpoint-<step>`: accelerate state + `state`, written atomically. Call on every process."""
    return save_checkpoint(accelerator, out, state.step, state.to_json(), keep)
