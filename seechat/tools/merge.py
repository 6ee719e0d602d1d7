"""LoRA merging: fold every LoRA update into its base weights, giving a plain model.

`merge_lora(model)` works in place on a loaded SeeChatVLM: the LLM's peft wrapper goes through
peft's own `merge_and_unload`; LoRA layers injected into the vision tower (which has no peft
wrapper) are merged layer by layer with peft's layer API. `merge_model(dir, out)` is what
`seechat merge` runs: load, merge, save a standalone checkpoint that refers to nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from seechat.models.base import SeeChatVLM


def merge_tower_lora(module: nn.Module) -> int:
    """Merge and remove LoRA layers injected (`inject_adapter_in_model`) into `module`;
    returns how many layers were merged."""
    # Outermost tuner layers only: their lora_A/lora_B children go with them.
    names = [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    for name in outer:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = getattr(parent, child)
        # peft's nn.MultiheadAttention LoRA (seechat.models.modes targets the attention module, never
        # its uncalled out_proj) folds into in_proj_weight and out_proj through its own method.
        if hasattr(layer, "unload_and_optionally_merge_module"):
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            base = layer.get_base_layer()
        setattr(parent, child, base)
    return len(outer)


def load_unquantised(model_dir: str | os.PathLike) -> SeeChatVLM:
    """The saved model with a QLoRA LM loaded as LoRA on a full-precision base: merging into a
    4-bit base would bake the quantisation error into the merged weights."""
    from seechat.models.kinds import load
    from seechat.models.saved import saved_modes

    return load(model_dir, modes={m: ("lora" if v == "qlora" else v) for m, v in saved_modes(model_dir).items()})


def merge_lora(model: SeeChatVLM) -> SeeChatVLM:
    """Fold the LLM's and the encoder's LoRA weights into their base weights, in place. Modes
    that were lora/qlora become frozen: the merged model has no LoRA left to train."""
    if model.llm_is_peft:
        model.llm = model.llm.merge_and_unload(safe_merge=True)
    merge_tower_lora(model.encoder.tower)
    for module, mode in model.modes.items():
        if mode in ("lora", "qlora"):
            model.modes[module] = "frozen"
            model.config.get(module, {})["mode"] = "frozen"
    return model


def merge_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Load the saved model at `model_dir`, merge its LoRA weights and write a standalone
    checkpoint (every module's weights stored, no references to Hub experts) to `out_dir`."""
    model = load_unquantised(model_dir)
    merge_lora(model)
    model.save_pretrained(out_dir, standalone=True)
    return Path(out_dir)
