"""The saved-model format, shared by every model kind: one `seechat.json` layout, written atomically.

A saved model is a directory with `seechat.json` = {"format", "model" (the resolved model
section, `kind` included), "modes", "stored" (which file holds what)} beside the files it names.
References to local experts in "model" are stored relative to the model directory (or absolute
when they are elsewhere on another drive), never relative to the working directory, so a saved
model loads from anywhere and after its run tree is copied elsewhere.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from seechat.errors import UserError

# 3: encoder.feature_layer >= 0 indexes hidden states as LLaVA does (0 = the embeddings; it was
# the block index before); 2: local references relative to the model directory; 1: as the recipe wrote them
FORMAT = 3
READABLE = (1, 2, 3)
META = "seechat.json"
# Keys of the model section that may refer to a local expert (or name a Hub model).
REFERENCES = (("encoder", "name"), ("encoder", "pretrained"), ("llm", "name_or_path"), ("llm", "tokenizer"),
              ("native", "vq"), ("init_from",))


class ModelDirError(UserError, ValueError):
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


def _local(value: Any) -> bool:
    """A string that names a local file or directory (not a Hub id, tag or model name)."""
    if not isinstance(value, str) or not value:
        return False
    hub_shaped = not value.startswith((".", "/", "~")) and value.count("/") <= 1
    return not hub_shaped or Path(value).expanduser().exists()


def _map_references(model_cfg: dict[str, Any], change) -> dict[str, Any]:
    """A copy of `model_cfg` with `change(value)` applied to each local reference."""
    out = copy.deepcopy(model_cfg)
    for key in REFERENCES:
        node = out
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key[-1]), str):
            node[key[-1]] = change(node[key[-1]])
    return out


def _relative_to(directory: Path):
    def change(value: str) -> str:
        if not _local(value):
            return value  # a Hub id (or an open_clip tag / model name)
        # Real paths on both sides (a relative value: from the cwd), so that a model directory
        # reached through a symlink refers to the experts beside its real place.
        target = os.path.realpath(Path(value).expanduser())
        try:
            relative = os.path.relpath(target, os.path.realpath(directory))
        except ValueError:  # another drive
            return target
        return relative if relative.startswith("..") else f"./{relative}"
    return change


def write_meta(tmp: Path, model_cfg: dict[str, Any], modes: dict[str, str], stored: dict[str, Any]) -> None:
    """seechat.json into `tmp` (the sibling of the model directory that `writing_dir` renames into
    place, so paths relative to it are relative to the model directory). Local experts are stored
    as `./...` or `../...` relative to the model directory, never relative to the cwd."""
    meta = {"format": FORMAT, "model": _map_references(model_cfg, _relative_to(tmp)), "modes": modes,
            "stored": stored}
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
    if not isinstance(meta, dict) or meta.get("format") not in READABLE:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ModelDirError(f"{meta_path}: format {got!r}, this seechat reads {', '.join(map(str, READABLE))}")
    if meta["format"] < 3:  # a non-negative feature_layer counted blocks from 0: same layer, new number
        for encoder in (meta["model"].get("encoder"), meta["stored"].get("encoder_config")):
            if isinstance(encoder, dict) and isinstance(encoder.get("feature_layer"), int) and encoder["feature_layer"] >= 0:
                encoder["feature_layer"] += 1
    if meta["format"] >= 2:  # relative references: to this directory, wherever it now lies
        meta["as_stored"] = meta["model"]
        meta["model"] = _map_references(
            meta["model"], lambda v: os.path.realpath(root / v) if v.startswith(".") else v)
    return meta


def require_references(meta: dict[str, Any], root: Path, keys: list[tuple[str, ...]]) -> None:
    """Check that the local experts at `keys` of the model section (those the loader is about to
    use) exist, naming the reference as stored and the directory it is relative to."""
    for key in keys:
        value, stored = meta["model"], meta.get("as_stored", meta["model"])
        for part in key:
            value = value.get(part) if isinstance(value, dict) else None
            stored = stored.get(part) if isinstance(stored, dict) else None
        if not _local(value) or Path(value).expanduser().exists():
            continue
        relative = f" (relative to the model directory {root})" if stored != value else ""
        raise ModelDirError(
            f"{root / META}: model.{'.'.join(key)}={stored!r}{relative}: no such file or directory: {value}. "
            "A saved model refers to the frozen experts it was trained with; copy them along, keeping "
            "their place relative to the model, or write a standalone model with `seechat merge`.")


def saved_modes(directory: str | os.PathLike) -> dict[str, str]:
    """The per-part modes a saved model was trained with (from its seechat.json)."""
    return dict(read_meta(directory)["modes"])
