"""What trains in a stage: one place decides, for each module (`encoder`, `adapter`, `llm`),
one of `frozen | full | lora | qlora`, applies it, and reports it as a table.

Stage defaults follow LLaVA: `align` trains only the adapter; `finetune` trains adapter + LLM
with the encoder frozen. Any module's mode can be overridden in the recipe (`llm.mode=lora`).
LoRA is applied to the LLM sub-module only, so a target list like ["q_proj", "v_proj"] can never
reach the vision tower (CLIP uses the same names); `check_lora_scope` asserts it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model, prepare_model_for_kbit_training
from torch import nn

if TYPE_CHECKING:
    from .model import SeeChatVLM

logger = logging.getLogger(__name__)

MODULES = ("encoder", "adapter", "llm")
VALID_MODES = {
    "encoder": ("frozen", "full", "lora"),
    "adapter": ("frozen", "full"),
    "llm": ("frozen", "full", "lora", "qlora"),
}
STAGE_DEFAULTS = {
    "align": {"encoder": "frozen", "adapter": "full", "llm": "frozen"},
    "finetune": {"encoder": "frozen", "adapter": "full", "llm": "full"},
}
DEFAULT_LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}


def resolve_modes(stage: str, model_cfg: dict[str, Any]) -> dict[str, str]:
    """Stage defaults overridden by each module's `mode` key, validated."""
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGE_DEFAULTS)}")
    modes = {}
    for module in MODULES:
        mode = (model_cfg.get(module) or {}).get("mode") or STAGE_DEFAULTS[stage][module]
        if mode not in VALID_MODES[module]:
            raise ValueError(
                f"{module}.mode={mode!r} is not valid; valid modes for {module}: "
                f"{', '.join(VALID_MODES[module])}"
            )
        modes[module] = mode
    return modes


def lora_config(cfg: dict[str, Any] | None, task_type: str | None) -> LoraConfig:
    merged = {**DEFAULT_LORA, **(cfg or {})}
    return LoraConfig(
        r=merged["r"],
        lora_alpha=merged["alpha"],
        lora_dropout=merged["dropout"],
        target_modules=merged["target_modules"],
        task_type=task_type,
    )


def apply_modes(model: "SeeChatVLM", modes: dict[str, str]) -> None:
    """Freeze, unfreeze or LoRA-wrap each module in place."""
    cfg = model.config
    # encoder
    tower = model.encoder.tower
    _set_trainable(tower, modes["encoder"] == "full")
    if modes["encoder"] == "lora" and not _has_lora(tower):
        inject_adapter_in_model(lora_config(cfg["encoder"].get("lora"), None), tower)
    if modes["encoder"] == "lora":
        for name, p in tower.named_parameters():
            p.requires_grad = "lora_" in name
    # adapter
    _set_trainable(model.adapter, modes["adapter"] == "full")
    # llm
    llm_mode = modes["llm"]
    if llm_mode in ("lora", "qlora"):
        if not model.llm_is_peft:
            llm = model.llm
            if llm_mode == "qlora":
                llm = prepare_model_for_kbit_training(
                    llm, use_gradient_checkpointing=bool(cfg["llm"].get("gradient_checkpointing"))
                )
            model.llm = get_peft_model(llm, lora_config(cfg["llm"].get("lora"), "CAUSAL_LM"))
        for name, p in model.llm.named_parameters():
            p.requires_grad = "lora_" in name
    else:
        if model.llm_is_peft:  # e.g. a LoRA checkpoint finetuned further in full
            model.llm = model.llm.merge_and_unload()
        _set_trainable(model.llm, llm_mode == "full")
    if cfg["llm"].get("gradient_checkpointing"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.modes = dict(modes)
    check_lora_scope(model)


def check_lora_scope(model: "SeeChatVLM") -> None:
    """LoRA weights may only live in modules whose mode is lora/qlora."""
    for module in MODULES:
        if model.modes.get(module) in ("lora", "qlora"):
            continue
        stray = [n for n, _ in getattr(model, module).named_parameters() if "lora_" in n]
        if stray:
            raise RuntimeError(
                f"LoRA weights found in {module} (mode {model.modes.get(module)!r}): {stray[:3]}"
            )


def parameter_table(model: "SeeChatVLM", lrs: dict[str, float] | None = None) -> str:
    """Trainable / frozen parameters per module, as printed at the start of training."""
    rows = [f"{'module':<8} {'mode':<7} {'trainable':>13} {'frozen':>13} {'lr':>9}"]
    for module in MODULES:
        params = list(getattr(model, module).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        lr = f"{lrs[module]:.2e}" if lrs and module in lrs and trainable else "-"
        rows.append(f"{module:<8} {model.modes.get(module, '?'):<7} {trainable:>13,} {frozen:>13,} {lr:>9}")
    return "\n".join(rows)


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad = trainable and torch.is_floating_point(p)


def _has_lora(module: nn.Module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())
