"""Load saved stitched models (the files `StitchedVLM._save_parts` writes; the format is
seechat/models/saved.py's): references to frozen experts are rebuilt, trained parts loaded."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file

from seechat.models.llm import hidden_size
from seechat.models.modes import apply_modes, inject_encoder_lora
from seechat.models.registry import TRAINING_KEYS
from seechat.models.saved import require_references
from seechat.models.stitched.build import assemble
from seechat.models.stitched.model import StitchedVLM


def _load_adapter(model: StitchedVLM, path: Path) -> None:
    """The saved adapter weights into `model.adapter`, with an error that says which expert no
    longer fits (e.g. the encoder a frozen reference points to was swapped for another width)."""
    saved = load_file(path)
    expected = model.adapter.state_dict()
    wrong = [f"{name}: saved {tuple(saved[name].shape)}, needed {tuple(tensor.shape)}"
             for name, tensor in expected.items() if name in saved and saved[name].shape != tensor.shape]
    if wrong:
        raise ValueError(
            f"{path} does not fit this model's adapter: the encoder gives {model.encoder.hidden_size}-wide "
            f"features and the LLM takes {hidden_size(model.base_llm)}-wide embeddings, but "
            + "; ".join(wrong[:3])
            + ". Were the encoder or LLM the saved model refers to replaced by ones of another width?"
        )
    model.adapter.load_state_dict(saved)


def load_stitched(
    root: Path,
    meta: dict[str, Any],
    trainable: bool = False,
    modes: dict[str, str] | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> StitchedVLM:
    """Rebuild a saved stitched model from its directory `root` and parsed seechat.json `meta`
    (see `seechat.models.kinds.load` for the arguments)."""
    cfg, saved_modes, stored = copy.deepcopy(meta["model"]), meta["modes"], meta["stored"]
    modes = modes or saved_modes
    # The frozen experts this model refers to instead of storing them (read_meta made the
    # references absolute from the model directory).
    used = [] if "encoder" in stored else [("encoder", "name"), ("encoder", "pretrained")]
    require_references(meta, root, used + ([] if "llm" in stored else [("llm", "name_or_path")]))
    for part in StitchedVLM.parts:
        override = (model_overrides or {}).get(part)
        if isinstance(override, dict):
            cfg[part].update({k: override[k] for k in TRAINING_KEYS if k in override})
    build_cfg = copy.deepcopy(cfg)
    build_cfg["llm"]["tokenizer"] = str(root / stored["tokenizer"])
    if "llm" in stored:
        build_cfg["llm"]["name_or_path"] = str(root / stored["llm"])
    if "encoder" in stored:
        build_cfg["encoder"] = {**stored["encoder_config"], "mode": cfg["encoder"].get("mode")}
    model = assemble(build_cfg, modes)
    model.config = cfg  # keep the original references, not this directory's paths

    _load_adapter(model, root / stored["adapter"])
    tower = model.encoder.tower
    if "encoder" in stored:
        tower.load_state_dict(load_file(root / stored["encoder"]))
    if "encoder_lora" in stored:
        inject_encoder_lora(model.encoder, cfg["encoder"].get("lora"))
        missing, unexpected = tower.load_state_dict(load_file(root / stored["encoder_lora"]), strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise ValueError(f"{root / stored['encoder_lora']} does not match the encoder's LoRA layout")
    if "llm_lora" in stored:
        model.llm = PeftModel.from_pretrained(model.llm, str(root / stored["llm_lora"]), is_trainable=trainable)
    apply_modes(model, modes)
    return model
