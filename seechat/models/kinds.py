"""The one registry of model kinds: how each kind is built from a recipe and loaded from disk.

`model.kind` in a recipe (and in a saved model's seechat.json) picks the row; saving is the
model's own (`SeeChatVLM.save_pretrained`). This is the only module that names a kind: a new
kind is a sibling package of `stitched/` and `native/` plus one row below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from seechat.models.base import SeeChatVLM
from seechat.models.modes import resolve_modes
from seechat.models.native.loading import load_native
from seechat.models.native.model import NativeVLM, build_native
from seechat.models.saved import read_meta
from seechat.models.stitched.build import build_stitched
from seechat.models.stitched.loading import load_stitched
from seechat.models.stitched.model import StitchedVLM


@dataclass(frozen=True)
class Kind:
    model: type[SeeChatVLM]
    build: Callable[[dict[str, Any], dict[str, str]], SeeChatVLM]
    load: Callable[..., SeeChatVLM]


KINDS: dict[str, Kind] = {
    "stitched": Kind(StitchedVLM, build_stitched, load_stitched),
    "native": Kind(NativeVLM, build_native, load_native),
}
DEFAULT_KIND = "stitched"


def kind_of(model_cfg: dict[str, Any]) -> Kind:
    name = model_cfg.get("kind") or DEFAULT_KIND
    if name not in KINDS:
        raise ValueError(f"unknown model.kind {name!r}; valid kinds: {', '.join(KINDS)}")
    return KINDS[name]


def parts_of(model_cfg: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The parts (name -> valid modes) of the kind `model_cfg` builds."""
    return kind_of(model_cfg).model.parts


def stage_modes(stage: str, model_cfg: dict[str, Any]) -> dict[str, str]:
    """What trains in `stage` for the model `model_cfg` describes (seechat/models/modes.py).
    A `mode` set for a part another kind has but this one lacks is an error, not ignored."""
    parts = parts_of(model_cfg)
    for part in sorted({p for kind in KINDS.values() for p in kind.model.parts} - set(parts)):
        mode = (model_cfg.get(part) or {}).get("mode")
        if mode:
            raise ValueError(f"{part}.mode={mode!r}: a {model_cfg.get('kind') or DEFAULT_KIND} model has no "
                             f"{part} part (its parts: {', '.join(parts)}); remove {part}.mode")
    return resolve_modes(stage, model_cfg, parts)


def build_model(model_cfg: dict[str, Any], modes: dict[str, str]) -> SeeChatVLM:
    """A ready-to-train model of the recipe's `model.kind`: built, then frozen / unfrozen /
    LoRA-wrapped per `modes`."""
    return kind_of(model_cfg).build(model_cfg, modes)


def load(
    directory: str | os.PathLike,
    trainable: bool = False,
    modes: dict[str, str] | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> SeeChatVLM:
    """Rebuild a saved model. `trainable=False` (default) freezes everything and sets eval mode.
    To continue training (e.g. finetune from an align run), pass `trainable=True`, the new
    stage's `modes`, and the recipe's `model` section, whose training keys (mode, lr, lora,
    gradient_checkpointing) replace the saved ones."""
    root = Path(directory)
    meta = read_meta(root)
    model = kind_of(meta["model"]).load(root, meta, trainable, modes, model_overrides)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
