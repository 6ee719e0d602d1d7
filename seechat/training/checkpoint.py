"""Training checkpoints that survive a kill at any instant.

A checkpoint is written to `.tmp-checkpoint-<step>/` (accelerate state from every process, then
`trainer_state.json` with the data position), flushed to disk (fsync of every file and
directory), and renamed to `checkpoint-<step>/` in one `os.replace`. Then the `latest` pointer
file is rewritten the same way (temp file, fsync, `os.replace`), so it is never half-written,
and checkpoints beyond the newest `keep` are retired: renamed to a temp name first, then
deleted, so a kill during the deletion leaves only a temp directory, never a checkpoint that
looks complete but lacks files. Resume reads `latest` (falling back to the newest complete
checkpoint) and removes temp directories a killed save left behind.

Every process calls `save_checkpoint` (accelerate saves per-process RNG states, and FSDP/
DeepSpeed shards); only the main process renames, writes the pointer and deletes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE = "trainer_state.json"
LATEST = "latest"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"


def _step(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def checkpoints(out: Path) -> list[Path]:
    """`checkpoint-<step>` directories, oldest first (complete or not)."""
    found = [p for p in Path(out).glob(f"{PREFIX}*") if p.is_dir() and _step(p) is not None]
    return sorted(found, key=_step)


def is_complete(checkpoint: Path) -> bool:
    # trainer_state.json is written last, after every process finished its part.
    return (checkpoint / STATE).is_file()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory` (and it) to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    out = Path(out)
    pointer = out / LATEST
    if pointer.is_file():
        named = out / pointer.read_text().strip()
        if named.parent == out and is_complete(named):
            return named
        logger.warning("%s names %s, which is missing or incomplete; using the newest complete checkpoint",
                       pointer, named.name)
    complete = [p for p in checkpoints(out) if is_complete(p)]
    return complete[-1] if complete else None


def remove_stale(out: Path) -> list[Path]:
    """Delete temp directories left by a save (or a pruning) that was killed; returns them."""
    stale = [p for p in Path(out).glob(f"{TMP_PREFIX}*") if p.is_dir()]
    for path in stale:
        logger.warning("removing %s, left by an interrupted checkpoint save", path)
        shutil.rmtree(path)
    return stale


def _retire(path: Path) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}retired-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.replace(path, tmp)
    shutil.rmtree(tmp)


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Write `checkpoint-<step>` atomically (see the module docstring); `state` is the trainer
    state (data position, counters) stored beside accelerate's. Keeps the newest `keep`
    checkpoints (all when `keep` is falsy). Call on every process."""
    out = Path(out)
    final, tmp = out / f"{PREFIX}{step}", out / f"{TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's files are in tmp before it is renamed
    if accelerator.is_main_process:
        with open(tmp / STATE, "w") as f:
            json.dump(state, f)
        fsync_tree(tmp)
        if final.exists():
            _retire(final)
        os.replace(tmp, final)
        _fsync(out)
        write_atomic(out / LATEST, final.name)
        for old in checkpoints(out)[:-keep] if keep else []:
            if old != final:
                _retire(old)
    accelerator.wait_for_everyone()
    return final
