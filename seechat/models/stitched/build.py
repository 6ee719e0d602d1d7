"""Assemble a stitched model from the `model` section of a recipe and the stage's modes."""
from __future__ import annotations

import copy
import logging
from typing import Any

from transformers import PreTrainedModel

from seechat.models.adapters import Experts
from seechat.models.llm import hidden_size, load_llm, load_tokenizer
from seechat.models.stitched.model import StitchedVLM
from seechat.models.modes import apply_modes
from seechat.models.registry import adapter_config, build_adapter, build_encoder

logger = logging.getLogger(__name__)


def assemble(model_cfg: dict[str, Any], modes: dict[str, str]) -> StitchedVLM:
    """Build encoder, LLM and adapter without applying modes (the loader injects saved LoRA
    weights in between). Adapter sizes the recipe leaves to the experts are derived here and
    written into the model's config, so a saved model names the sizes it was built with."""
    cfg = copy.deepcopy(model_cfg)
    for key in ("encoder", "adapter", "llm"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"model.{key} must be a mapping, got {cfg.get(key)!r}")
    tokenizer = load_tokenizer(cfg["llm"])
    encoder = build_encoder(cfg["encoder"])
    llm = load_llm(cfg["llm"], tokenizer, quantize_4bit=modes["llm"] == "qlora")
    experts = Experts(encoder.hidden_size, tuple(encoder.grid), hidden_size(llm), _num_layers(llm))
    cfg["adapter"] = adapter_config(cfg["adapter"], experts)
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
    warn_if_adapter_outweighs_llm(model)
    apply_modes(model, modes)
    return model


def warn_if_adapter_outweighs_llm(model: StitchedVLM) -> None:
    """One warning line, before step one, when the adapter has more parameters than the LM it
    feeds: the adapter then costs most of each step (a BLIP-2-sized Q-Former before a tiny LM)."""
    adapter = sum(p.numel() for p in model.adapter.parameters())
    llm = model.llm.num_parameters()  # counts 4-bit weights as the parameters they stand for
    if adapter > llm:
        sizes = {k: v for k, v in model.config["adapter"].items() if k != "type" and isinstance(v, int)}
        logger.warning(
            "adapter %s has %s parameters, more than the LM's %s (%s): set smaller sizes in "
            "model.adapter, or leave them out of the recipe to follow the LM",
            model.config["adapter"].get("type"), f"{adapter:,}", f"{llm:,}",
            ", ".join(f"{k}={v}" for k, v in sizes.items()) or "as configured",
        )


def _num_layers(llm: PreTrainedModel) -> int:
    return llm.config.get_text_config().num_hidden_layers
