"""Load saved native early-fusion models (the files `NativeVLM._save_parts` writes: `tokenizer/`,
`vq/` (vq.json + vq.safetensors) and `llm/`; the format is seechat/models/saved.py's)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from seechat.models.modes import apply_modes
from seechat.models.native.model import NativeVLM, assemble_native
from seechat.models.native.vq import VQTokenizer
from seechat.models.registry import TRAINING_KEYS

# The native switches that may change when training continues from a saved model.
NATIVE_TRAINING_KEYS = ("z_loss", "attention_dropout", "hidden_dropout")


def load_native(root: Path, meta: dict[str, Any], trainable: bool = False, modes: dict[str, str] | None = None,
                model_overrides: dict[str, Any] | None = None) -> NativeVLM:
    """Rebuild a saved native model (see `seechat.models.kinds.load` for the arguments)."""
    cfg, stored = copy.deepcopy(meta["model"]), meta["stored"]
    modes = modes or meta["modes"]
    for section, keys in (("llm", TRAINING_KEYS), ("native", NATIVE_TRAINING_KEYS)):
        override = (model_overrides or {}).get(section)
        if isinstance(override, dict):
            cfg[section].update({k: override[k] for k in keys if k in override})
    build_cfg = copy.deepcopy(cfg)
    build_cfg["llm"].update(tokenizer=str(root / stored["tokenizer"]), name_or_path=str(root / stored["llm"]),
                            config=None)
    build_cfg["native"].update(init_from=None, code_init_share=0.0, code_word_share=0.0)  # the saved LM already holds the codes' rows
    model = assemble_native(build_cfg, VQTokenizer.from_pretrained(root / stored["vq"]))
    model.config = cfg  # the original references, not this directory's paths
    apply_modes(model, modes)
    return model
