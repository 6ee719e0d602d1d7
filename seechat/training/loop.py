"""One accelerate loop for every stage (align, finetune): recipe in, run directory out.

The run directory holds `recipe.yaml` (resolved), `metrics.jsonl`, TensorBoard logs,
`checkpoint-<step>/` (accelerate state: model, optimizer, scheduler, RNG + `trainer_state.json`
with the data position) and `final/` (a saved seechat model). `resume=True` continues from the
latest checkpoint; the continued run matches an uninterrupted one (same seed, same order).

`run` reads as its steps: set up (training/setup.py), resume (training/state.py), train
(`_Loop`: batches grouped into updates, one update with token-weighted accumulation, then
logging, validation and checkpoints), finish (final/, validation, curves); the teardown
(progress, metrics file, trackers) is written once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
from accelerate import Accelerator

from seechat.data import LengthGroupedSampler
from seechat.data.packing import check_packed_attention
from seechat.data.tokenization import IGNORE_INDEX
from seechat.models.loss import reuse_frozen_head_casts
from seechat.training.guard import NonFiniteError, NonFiniteGuard
from seechat.training.metrics import RunLog
from seechat.training.setup import Session, model_for, prepare
from seechat.training.state import TrainState, resume_state, save_state
from seechat.training.validation import EvaluateFile, Validation

__all__ = ["model_for", "run"]

logger = logging.getLogger(__name__)


def run(recipe: dict, resume: bool = False, evaluate: EvaluateFile | None = None) -> dict[str, Any]:
    """Train per `recipe`; returns a summary (final dir, steps, last loss, samples/s, skipped).

    `evaluate` scores the model on `data.val` (seechat.inference.evaluate.evaluate_file); it is
    required when the recipe sets `data.val` (training/validation.py says why it is passed in)."""
    validation = Validation(recipe, evaluate)
    session = prepare(recipe, check_engine=validation.check_engine)
    accelerator = session.accelerator
    state, resumed_rng = resume_state(accelerator, session.out, resume, session.dataset.read_skipped)
    log = RunLog(recipe, accelerator, session.out, session.total, state.step)
    try:
        if recipe["data"]["packing"]:  # on the device and in the precision of training
            check_packed_attention(session.unwrapped.base_llm, accelerator.autocast())
        session.model.train()
        loop = _Loop(recipe["train"], session, state, log, validation)
        with reuse_frozen_head_casts():  # a frozen LM head is cast to bf16 once, not every step
            loop.train(resumed_rng)
        if state.step < session.total and not loop.timed_out:  # stop_after: like a killed run (no final/)
            return {"stopped_at": state.step, "loss": loop.last_loss}
        return _finish(session, loop, log, validation)
    finally:
        log.close()
        accelerator.end_training()


class _Loop:
    """The training loop proper: reads batches, groups them into updates, applies them."""

    def __init__(self, tcfg: dict, session: Session, state: TrainState, log: RunLog, validation: Validation) -> None:
        self.tcfg, self.s, self.state, self.log, self.validation = tcfg, session, state, log, validation
        self.guard = NonFiniteGuard(tcfg["max_nonfinite_steps"])
        self.guard.total = state.nonfinite_steps
        self.seen, self.t0, self.last_loss = 0, time.time(), float("nan")
        self.window: list[torch.Tensor] = []  # this update's token-weighted losses ...
        self.window_tokens: list[torch.Tensor] = []  # ... and supervised token counts
        self.finite = True  # the last update's loss and gradients
        self.timed_out = False
        self.validated_at: int | None = None
        self.val_accuracy: float | None = None  # main process: the last validation's

    def seconds(self) -> float:
        """Seconds of training so far (time spent validating left out)."""
        return time.time() - self.t0 - self.validation.seconds

    def train(self, resumed_rng: torch.Tensor | None) -> None:
        """Epochs of updates until the last step, `train.stop_after` or `train.max_seconds`."""
        s, state, accelerator = self.s, self.state, self.s.accelerator
        finished = state.step >= s.total
        while not finished:
            if hasattr(s.loader, "set_epoch"):
                s.loader.set_epoch(state.epoch)
            if isinstance(s.sampler, LengthGroupedSampler):
                s.sampler.set_epoch(state.epoch)
            batches = accelerator.skip_first_batches(s.loader, state.batches_done) if state.batches_done else s.loader
            micro: list[dict] = []  # the micro-batches of one update (train.grad_accum of them)
            for batch in batches:
                if resumed_rng is not None:
                    torch.set_rng_state(resumed_rng)
                    resumed_rng = None
                state.batches_done += 1
                state.skipped += batch["skipped"]
                if batch["input_ids"] is not None:  # None: every sample of the batch was skipped
                    # (safe with several processes: the collectives below are per update, not per
                    # batch, and this process goes on to its next batch; test_distributed)
                    micro.append(batch)
                if not micro or (len(micro) < self.tcfg["grad_accum"]
                                 and not accelerator.gradient_state.end_of_dataloader):
                    continue
                self.accumulate(micro)
                micro = []
                self.apply()
                if self.report():
                    finished = True
                    break
            else:
                state.epoch, state.batches_done = state.epoch + 1, 0

    def accumulate(self, micro: list[dict]) -> None:
        """Forward and backward of one update's micro-batches, token-weighted.

        Every supervised token of the update weighs the same, whichever micro-batch and process
        holds it: micro-batch i of a process is weighted by its share of the update's global
        token count (so 2 processes x 2 micro-batches of 1 train exactly like 1 process x 1
        batch of 4). Accumulation syncs DDP only on the last micro-batch."""
        accelerator, model, unwrapped = self.s.accelerator, self.s.model, self.s.unwrapped
        counts = [(unwrapped.supervised_labels(b["input_ids"], b["labels"])[:, 1:] != IGNORE_INDEX)
                  .sum().float() for b in micro]
        total_tokens = torch.stack(counts).sum()
        if accelerator.num_processes > 1:
            total_tokens = accelerator.reduce(total_tokens.clone(), reduction="sum")
        # (accelerate divides each backward by grad_accum and DDP averages over processes;
        # written so that one process without accumulation multiplies the loss by exactly 1)
        undo = accelerator.gradient_accumulation_steps * accelerator.num_processes
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            # DeepSpeed's engine steps inside backward where accelerate says an update ends
            accelerator.sync_gradients = last
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = model(
                    input_ids=b["input_ids"],
                    attention_mask=b["attention_mask"],
                    pixel_values=b["pixel_values"],
                    num_images=b["num_images"],
                    labels=b["labels"],
                    sample_ids=b["ids"],
                    image_features=b.get("image_features"),
                    position_ids=b.get("position_ids"),
                ).loss
                accelerator.backward(loss * (counts[i] / total_tokens.clamp(min=1) * undo))
            self.window.append(loss.detach().float() * counts[i])
            self.window_tokens.append(counts[i])
            # Samples, not rows: a packed row holds several (data/packing.py names them in "rows").
            rows = b["rows"] if "rows" in b else range(b["input_ids"].shape[0])
            self.seen += sum(len(r) if isinstance(r, (list, tuple)) else 1 for r in rows) * accelerator.num_processes

    def apply(self) -> None:
        """Clip, check and apply the accumulated gradients; one optimizer step."""
        accelerator, optimizer = self.s.accelerator, self.s.optimizer
        # max_norm=inf measures without clipping: the guard needs the norm either way.
        norm = accelerator.clip_grad_norm_(self.s.model.parameters(), self.tcfg["max_grad_norm"] or math.inf)
        self.finite = self.guard.is_finite(accelerator, self.window, norm)
        # A NaN/inf update is not applied: zero_grad below drops it. With fp16's GradScaler the
        # optimizer still "steps": the scaler skips a non-finite step itself, and must see it
        # to lower its scale (and reset its unscale state).
        if self.finite or accelerator.scaler is not None:
            optimizer.step()
        self.s.scheduler.step()  # skipped updates count as steps: the schedule ends on time
        optimizer.zero_grad()
        self.state.step += 1

    def report(self) -> bool:
        """Log the update, validate and save when due; True when the run stops here."""
        accelerator, state, tcfg = self.s.accelerator, self.state, self.tcfg
        step = state.step
        stop_message = self.guard.update(self.finite, step)
        state.nonfinite_steps = self.guard.total
        # mean over every supervised token of the update, on all processes
        summed = accelerator.reduce(torch.stack([torch.stack(self.window).sum(), torch.stack(self.window_tokens).sum()]),
                                    reduction="sum")
        self.last_loss = (summed[0] / summed[1].clamp(min=1)).item()
        self.window, self.window_tokens = [], []
        seconds = self.seconds()
        record = {"step": step, "loss": self.last_loss, "lr": self.s.scheduler.get_last_lr()[0],
                  "samples_per_s": self.seen / max(seconds, 1e-9), "seconds": seconds,
                  **({"nonfinite_steps": self.guard.total} if self.guard.total else {})}
        self.log.step(record)
        if not stop_message and step < self.s.total and self.validation.due(step):
            self.validate()
        if stop_message or (tcfg["save_every"] and step % tcfg["save_every"] == 0):
            save_state(accelerator, self.s.out, state, tcfg["save_total_limit"])
        if stop_message:
            raise NonFiniteError(f"{stop_message} Checkpoint (weights before those steps): "
                                 f"{self.s.out / f'checkpoint-{step}'}")
        if tcfg.get("max_seconds"):  # every process stops at the same step: any one over budget stops all
            over = torch.tensor([self.seconds() >= tcfg["max_seconds"]], device=accelerator.device)
            self.timed_out = bool(accelerator.gather(over).any())
        stop_after = tcfg.get("stop_after")
        return step >= self.s.total or self.timed_out or bool(stop_after and step >= stop_after)

    def validate(self) -> None:
        """data.val now (every process; the main one evaluates), then back to training mode."""
        record = self.validation.run(self.s.accelerator, self.s.unwrapped, self.state.step)
        if record is not None:
            self.log.write(record)
            self.val_accuracy = record["val/accuracy"]
        self.s.model.train()
        self.validated_at = self.state.step


def _finish(session: Session, loop: _Loop, log: RunLog, validation: Validation) -> dict[str, Any]:
    """Save final/, validate it, draw the curves; the run's summary."""
    accelerator, state = session.accelerator, loop.state
    loop_seconds = loop.seconds()
    log.progress.close()
    accelerator.wait_for_everyone()
    # A bad sample is met once per epoch: count samples, not encounters.
    all_skipped = list({s[0]: s[1] for part in _gather_objects(accelerator, state.skipped) for s in part}.items())
    final = session.out / "final"
    if accelerator.is_main_process:
        session.unwrapped.save_pretrained(final)
        if all_skipped:
            logger.warning("skipped %d bad samples: %s", len(all_skipped), [s[0] for s in all_skipped][:20])
        accelerator.print(f"skipped samples: {len(all_skipped)}")
    if validation.enabled and loop.validated_at != state.step:
        loop.validate()
    if accelerator.is_main_process:
        log.close()
        from seechat.training.plots import plot_curves  # loss / lr curves as PNG next to the TensorBoard logs

        plot_curves(session.out / "metrics.jsonl", session.out / "logs")
    elapsed = time.time() - loop.t0
    return {
        "final": str(final),
        "steps": state.step,
        "loss": loop.last_loss,
        "samples": loop.seen,  # training samples read, over all processes
        "samples_per_s": loop.seen / max(elapsed - validation.seconds, 1e-9),
        "seconds": elapsed,
        "loop_seconds": loop_seconds,  # training steps only (elapsed also counts saving final/)
        "stopped_by_max_seconds": loop.timed_out,
        "trainable_parameters": sum(p.numel() for g in session.groups for p in g["params"]),
        "skipped": all_skipped,
        "nonfinite_steps": loop.guard.total,
        **({"val_accuracy": loop.val_accuracy} if validation.enabled else {}),
    }


def _gather_objects(accelerator: Accelerator, obj: list) -> list[list]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])
