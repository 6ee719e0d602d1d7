"""Assemble a stitched model from the `model` section of a recipe and the stage's modes."""
from __future__ import annotations

import copy
from typing import Any

from seechat.models.llm import hidden_size, load_llm, load_tokenizer
from seechat.models.stitched.model import StitchedVLM
from seechat.models.modes import apply_modes
from seechat.models.registry import build_adapter, build_encoder


def assemble(model_cfg: dict[str, Any], modes: dict[str, str]) -> StitchedVLM:
    """Build encoder, LLM and adapter without applying modes (the loader injects saved LoRA
    weights in between)."""
    cfg = copy.deepcopy(model_cfg)
    for key in ("encoder", "adapter", "llm"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"model.{key} must be a mapping, got {cfg.get(key)!r}")
    tokenizer = load_tokenizer(cfg["llm"])
    encoder = build_encoder(cfg["encoder"])
    llm = load_llm(cfg["llm"], tokenizer, quantize_4bit=modes["llm"] == "qlora")
    adapter = build_adapter(cfg["adapter"], encoder.hidden_size, hidden_size(llm))
    if adapter.needs_square_grid and encoder.grid[0] != encoder.grid[1]:
        raise ValueError(
            f"adapter type {cfg['adapter'].get('type')!r} (as configured) needs a square patch grid; "
            f"encoder {cfg['encoder'].get('name')!r} gives {encoder.grid[0]}x{encoder.grid[1]} patches"
        )
    adapter.num_tokens(encoder.num_patches)  # a grid the adapter cannot read fails here, not mid-run
    return StitchedVLM(cfg, encoder, adapter, llm, tokenizer)


def build_stitched(model_cfg: dict[str, Any], modes: dict[str, str]) -> StitchedVLM:
    """A ready-to-train model: assembled, then frozen / unfrozen / LoRA-wrapped per `modes`."""
    model = assemble(model_cfg, modes)
    apply_modes(model, modes)
    return model
