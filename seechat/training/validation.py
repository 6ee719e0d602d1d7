"""Validation during training: the recipe's `data.val` questions answered by the model being
trained, scored by exact match, every `eval.every` optimizer steps and at the end of the stage.

Scoring generated answers is the job of seechat/inference/evaluate.py, a room above training,
so the loop does not import it: the caller passes it in (`run(recipe, evaluate=evaluate_file)`),
and this module only decides when to call it, with which recipe settings, and where the
result goes (a `val/...` record in metrics.jsonl, the trackers, the console).

Validation does not change training: the global RNG is restored afterwards (building the
evaluation's DataLoader iterator draws from it) and the model is put back in training mode,
so a run with validation trains exactly like one without.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from accelerate import Accelerator

from seechat.models.base import SeeChatVLM


class EvaluateFile(Protocol):
    """seechat.inference.evaluate.evaluate_file: exact-match accuracy on a LLaVA JSON file."""

    def __call__(self, model: SeeChatVLM, path: str, *, image_root: str | None, max_samples: int | None,
                 batch_size: int, max_new_tokens: int) -> dict[str, Any]: ...


class Validation:
    """When and how a run validates; `enabled` is False when the recipe sets no `data.val`."""

    def __init__(self, recipe: dict, evaluate: EvaluateFile | None) -> None:
        ecfg = recipe["eval"]
        self.path: str | None = recipe["data"]["val"]
        self.image_root = recipe["data"]["image_root"]
        self.every: int = ecfg["every"] or 0
        self.settings = {"max_samples": ecfg["max_samples"], "batch_size": ecfg["batch_size"],
                         "max_new_tokens": ecfg["max_new_tokens"]}
        self.evaluate = evaluate
        self.seconds = 0.0  # spent validating (not training): the loop leaves it out of its rates
        if self.every < 0:
            raise ValueError(f"eval.every={self.every}; it must be 0 (only at the end of the stage) or a step count")
        if not self.path:
            return
        if recipe["data"]["format"] != "llava":
            raise ValueError(f"data.val={self.path!r} with data.format={recipe['data']['format']!r}: validation "
                             "reads a LLaVA JSON/JSONL file; convert the split, or unset data.val")
        if not Path(self.path).is_file():  # now, not after the first stretch of training
            raise FileNotFoundError(f"data.val file {self.path} does not exist")
        if evaluate is None:
            raise ValueError(
                f"data.val={self.path!r} is set, but this call of seechat.training.loop.run got no evaluate=: "
                "pass run(recipe, evaluate=seechat.inference.evaluate.evaluate_file), or unset data.val")

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def check_engine(self, accelerator: Accelerator) -> None:
        """Validation generates on the main process alone, with the whole model on it."""
        engine = accelerator.distributed_type.name
        if self.enabled and engine in ("FSDP", "DEEPSPEED"):
            raise ValueError(f"data.val: validation during training runs on one process, which under {engine} "
                             "holds a shard of the model; unset data.val and evaluate final/ with `seechat eval`")

    def due(self, step: int) -> bool:
        return self.enabled and self.every > 0 and step % self.every == 0

    def run(self, accelerator: Accelerator, model: SeeChatVLM, step: int) -> dict[str, Any] | None:
        """Validate `model` (unwrapped) on the main process; returns the metrics record there
        (None elsewhere). Every process must call it: they wait for the main one."""
        start = time.time()
        record = None
        if accelerator.is_main_process:
            with _rng_kept(accelerator.device), accelerator.autocast():
                result = self.evaluate(model, self.path, image_root=self.image_root, **self.settings)
            record = {"step": step, "val/accuracy": result["accuracy"], "val/correct": result["correct"],
                      "val/n": result["n"]}
            accelerator.print(f"step {step}: val/accuracy {result['accuracy']:.4f} "
                              f"({result['correct']}/{result['n']}, {self.path})")
        accelerator.wait_for_everyone()
        self.seconds += time.time() - start
        return record


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Torch's global RNG (CPU, and the accelerator's) as it was before the block."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
        return
    with torch.random.fork_rng(devices=[device.index or 0], device_type=device.type):
        yield
