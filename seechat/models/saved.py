"""The saved-model format, shared by every model kind: one `seechat.json` layout, written atomically.

A saved model is a directory with `seechat.json` = {"format", "model" (the resolved model
section, `kind` included), "modes", "stored" (which file holds what)} beside the files it names.
References to local experts in "model" are stored relative to the model directory (or absolute
when they are elsewhere on another drive), never relative to the working directory, so a saved
model loads from anywhere and after its run tree is copied elsewhere.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

FORMAT = 1
META = "seechat.json"


class ModelDirError(ValueError):
    """A directory that is not a readable saved seechat model (missing, wrong format)."""


def check_output_dir(directory: str | os.PathLike, marker: str) -> Path:
    """`directory` if seechat may write it: new, empty, or an earlier output of the same kind
    (it holds the file `marker`), which is replaced whole. Anything else is refused."""
    final = Path(directory)
    if final.is_file() or (final.is_dir() and any(final.iterdir()) and not (final / marker).is_file()):
        raise FileExistsError(f"{final} exists and is not an earlier seechat output (no {marker} in it); "
                              "refusing to replace it. Give a new or empty directory.")
    return final


@contextlib.contextmanager
def writing_dir(directory: str | os.PathLike, marker: str):
    """Write into a temporary directory beside `directory` (`.NAME.seechat-tmp`), which
    replaces `directory` when the block ends (the old one is moved aside first, then deleted)
    and is removed if the block fails. No stale file of an earlier output survives, and only
    what `check_output_dir` allows is ever deleted."""
    final = check_output_dir(directory, marker)
    tmp = final.with_name(f".{final.name}.seechat-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
        check_output_dir(directory, marker)  # (still true after the work?)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.seechat-old")
    shutil.rmtree(old, ignore_errors=True)
    if final.is_symlink() or final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def write_meta(tmp: Path, model_cfg: dict[str, Any], modes: dict[str, str], stored: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "model": model_cfg, "modes": modes, "stored": stored}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `seechat.json` of a saved model, checked for this seechat's format."""
    root = Path(directory)
    meta_path = root / META
    if not root.is_dir():
        raise ModelDirError(f"{root}: no such model directory (give the directory a run saved, e.g. RUN/final)")
    if not meta_path.is_file():
        raise ModelDirError(f"{root} is not a saved seechat model: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{meta_path} is not valid JSON ({e}); the model directory is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ModelDirError(f"{meta_path}: format {got!r}, this seechat reads {FORMAT}")
    return meta


def saved_modes(directory: str | os.PathLike) -> dict[str, str]:
    """The per-part modes a saved model was trained with (from its seechat.json)."""
    return dict(read_meta(directory)["modes"])
