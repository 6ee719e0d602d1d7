"""What a run reports while it trains: one JSON record per logged step in `metrics.jsonl`, the
same values to the trackers (TensorBoard), and progress on the terminal.

Progress is a tqdm bar when stderr is a terminal. When it is not (a log file, a batch job), a
bar would write a redrawn line per update into the file, so a plain line is printed instead,
at most once every `LINE_SECONDS` and at the last step.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from accelerate import Accelerator
from tqdm.auto import tqdm

LINE_SECONDS = 60.0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


class Progress:
    """A tqdm bar on a terminal; otherwise a line every `every_seconds` (and at `total`)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, stream: TextIO | None = None,
                 every_seconds: float = LINE_SECONDS) -> None:
        self.stream = stream or sys.stderr
        self.total, self.step, self.desc = total, initial, desc
        self.enabled, self.every_seconds = enabled, every_seconds
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, mininterval=2, file=self.stream)
        self.last_line = time.monotonic()

    def update(self, **postfix: str) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**postfix)
            return
        now = time.monotonic()
        if self.enabled and (self.step >= self.total or now - self.last_line >= self.every_seconds):
            self.last_line = now
            fields = " ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"{self.desc}: step {self.step}/{self.total} {fields}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLog:
    """metrics.jsonl (main process), trackers and progress of one run; `close` is idempotent."""

    def __init__(self, recipe: dict, accelerator: Accelerator, out: Path, total: int, step: int) -> None:
        tcfg = recipe["train"]
        self.accelerator = accelerator
        self.trackers = bool(tcfg["trackers"])
        self.log_every, self.total = tcfg["log_every"], total
        if self.trackers:
            accelerator.init_trackers("seechat", config=_flat({"train": tcfg, "stage": recipe["stage"]}))
        self.file: TextIO | None = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
        self.progress = Progress(total, step, recipe["stage"], enabled=accelerator.is_main_process)

    def step(self, record: dict[str, Any]) -> None:
        """Report one optimizer step (`record` has step, loss, lr, samples_per_s)."""
        step = record["step"]
        self.progress.update(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
        if step % self.log_every == 0 or step == self.total:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl and the same values to the trackers."""
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.progress.close()
        if self.file is not None:
            self.file.close()
            self.file = None
