"""Save and load native early-fusion models; `seechat.load` dispatches here on `model.kind`.

A saved native model is self-contained (the LM was trained from scratch or in full, and the VQ
tokenizer is small): `seechat.json` (resolved model config with `kind: native`, modes, what is
stored where), `tokenizer/`, `vq/` (vq.json + vq.safetensors) and `llm/` (transformers
`save_pretrained`, safetensors). Nothing is pickled.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from ..modes import apply_modes
from .model import NativeVLM, assemble_native, check_native_modes
from .vq import VQTokenizer

FORMAT = 1  # the same format number as seechat.saving: one seechat.json layout, two kinds
META = "seechat.json"
# Keys of a recipe's model section that may change when training continues from a saved model.
TRAINING_KEYS = {"llm": ("mode", "lr", "gradient_checkpointing"),
                 "native": ("z_loss", "attention_dropout", "hidden_dropout")}


def save_native(model: NativeVLM, directory: str | os.PathLike) -> None:
    """Write `model` to `directory` (written beside it, then renamed into place)."""
    from seechat.saving import writing_dir

    with writing_dir(directory, META) as tmp:
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        model.encoder.save_pretrained(tmp / "vq")
        model.base_llm.save_pretrained(tmp / "llm")
        meta = {"format": FORMAT, "model": model.config, "modes": model.modes,
                "stored": {"tokenizer": "tokenizer", "vq": "vq", "llm": "llm"}}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))


def load_native(root: Path, meta: dict, trainable: bool = False, modes: dict[str, str] | None = None,
                model_overrides: dict[str, Any] | None = None) -> NativeVLM:
    """Rebuild a saved native model (see `seechat.saving.load` for the arguments)."""
    cfg, stored = copy.deepcopy(meta["model"]), meta["stored"]
    modes = modes or meta["modes"]
    check_native_modes(modes)
    for section, keys in TRAINING_KEYS.items():
        override = (model_overrides or {}).get(section)
        if isinstance(override, dict):
            cfg[section].update({k: override[k] for k in keys if k in override})
    build_cfg = copy.deepcopy(cfg)
    build_cfg["llm"].update(tokenizer=str(root / stored["tokenizer"]), name_or_path=str(root / stored["llm"]),
                            config=None)
    model = assemble_native(build_cfg, VQTokenizer.from_pretrained(root / stored["vq"]))
    model.config = cfg  # the original references, not this directory's paths
    apply_modes(model, modes)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
