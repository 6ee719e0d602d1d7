"""What trains in a stage: one place decides, for each module (`encoder`, `adapter`, `llm`),
one of `frozen | full | lora | qlora`, applies it, and reports it as a table.

Stage defaults follow LLaVA: `align` trains only the adapter; `finetune` trains adapter + LLM
with the encoder frozen. Any module's mode can be overridden in the recipe (`llm.mode=lora`).
LoRA is applied to the LLM sub-module only, so a target list like ["q_proj", "v_proj"] can never
reach the vision tower (CLIP uses the same names); `check_lora_scope` asserts it.

Encoder LoRA targets only layers that feed the features (`encoder_lora_targets`): a probe
forward/backward on one blank image (meta tensors: shapes only) finds them, so blocks after `feature_layer` (skipped by
open_clip's `stop_early`, or computed but unused by transformers towers) and unused heads get no
LoRA that could never train. `torch.nn.MultiheadAttention` (open_clip's attention) never calls its
`out_proj` and has no Linear for q/k/v (`in_proj_weight`), so LoRA on its Linear children would be
dead: `all-linear` targets the MultiheadAttention module itself, which peft wraps as a whole
(LoRA on in_proj and out_proj, merged into the weights around each forward), and naming such a
child explicitly is an error.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

if TYPE_CHECKING:
    from seechat.models.encoders.base import VisionEncoder
    from seechat.models.base import SeeChatVLM

logger = logging.getLogger(__name__)

STAGE_DEFAULTS = {
    "align": {"encoder": "frozen", "adapter": "full", "llm": "frozen"},
    "finetune": {"encoder": "frozen", "adapter": "full", "llm": "full"},
}
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}


def resolve_modes(stage: str, model_cfg: dict[str, Any], parts: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """For each of a model kind's `parts` (name -> valid modes): the stage default (a part no
    stage names defaults to its first valid mode) overridden by the part's `mode` key, validated."""
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGE_DEFAULTS)}")
    modes = {}
    for part, valid in parts.items():
        mode = (model_cfg.get(part) or {}).get("mode") or STAGE_DEFAULTS[stage].get(part, valid[0])
        if mode not in valid:
            raise ValueError(f"{part}.mode={mode!r} is not valid; valid modes for {part}: {', '.join(valid)}")
        modes[part] = mode
    return modes


def lora_config(cfg: dict[str, Any] | None, task_type: str | None) -> LoraConfig:
    merged = {**LORA_DEFAULTS, **(cfg or {})}
    return LoraConfig(
        r=merged["r"],
        lora_alpha=merged["alpha"],
        lora_dropout=merged["dropout"],
        target_modules=merged["target_modules"],
        task_type=task_type,
    )


def apply_modes(model: "SeeChatVLM", modes: dict[str, str]) -> None:
    """Freeze, unfreeze or LoRA-wrap each of the model's parts in place."""
    for part, mode in modes.items():
        if part == "llm":
            _apply_llm_mode(model, mode)
        elif mode == "lora":  # a vision encoder: LoRA on the tower's live layers
            tower = model.encoder.tower
            if not _has_lora(tower):
                inject_encoder_lora(model.encoder, model.config["encoder"].get("lora"))
            for name, p in tower.named_parameters():
                p.requires_grad = "lora_" in name
        else:
            _set_trainable(model.part(part), mode == "full")
    if model.config["llm"].get("gradient_checkpointing"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.modes = dict(modes)
    check_lora_scope(model)


def _apply_llm_mode(model: "SeeChatVLM", mode: str) -> None:
    cfg = model.config["llm"]
    if mode in ("lora", "qlora"):
        if not model.llm_is_peft:
            llm = model.llm
            if mode == "qlora":
                llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=bool(cfg.get("gradient_checkpointing")))
            model.llm = get_peft_model(llm, lora_config(cfg.get("lora"), "CAUSAL_LM"))
        for name, p in model.llm.named_parameters():
            p.requires_grad = "lora_" in name
    else:
        if model.llm_is_peft:  # e.g. a LoRA checkpoint finetuned further in full
            model.llm = model.llm.merge_and_unload()
        _set_trainable(model.llm, mode == "full")


def inject_encoder_lora(encoder: "VisionEncoder", cfg: dict[str, Any] | None) -> list[str]:
    """Wrap the encoder tower's live layers (`encoder_lora_targets`) with LoRA, in place;
    returns the wrapped module names."""
    requested = {**LORA_DEFAULTS, **(cfg or {})}["target_modules"]
    targets = encoder_lora_targets(encoder, requested)
    inject_adapter_in_model(lora_config({**(cfg or {}), "target_modules": targets}, None), encoder.tower)
    return targets


def encoder_lora_targets(encoder: "VisionEncoder", requested: str | list[str]) -> list[str]:
    """Names (from the tower root) of the modules that `requested` ("all-linear", a list of
    names or a regex, as peft reads them) selects and that take part in computing the features.
    Raises on a target that could never act: a Linear inside nn.MultiheadAttention."""
    tower = encoder.tower
    modules = dict(tower.named_modules())
    mha_children = {
        f"{name}.{child}": name
        for name, m in modules.items() if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    all_linear = isinstance(requested, str) and requested.lower() == "all-linear"
    if all_linear:
        candidates = [
            n for n, m in modules.items()
            if (isinstance(m, nn.Linear) and n not in mha_children) or isinstance(m, nn.MultiheadAttention)
        ]
    else:
        probe = LoraConfig(target_modules=requested)
        candidates = [n for n in modules if n and check_target_module_exists(probe, n)]
        dead = [n for n in candidates if n in mha_children]
        if dead:
            raise ValueError(
                f"encoder.lora.target_modules={requested!r} selects {dead[0]!r}"
                f"{f' (and {len(dead) - 1} more)' if len(dead) > 1 else ''}, a child of "
                f"nn.MultiheadAttention {mha_children[dead[0]]!r}: MultiheadAttention reads its "
                f"weights directly and never calls it, so LoRA there would never act or train. "
                f"Target the attention module itself ({mha_children[dead[0]].rpartition('.')[2]!r}: "
                f"LoRA on its q/k/v and output projections) or use 'all-linear'"
            )
    live = _live_modules(encoder, candidates)
    targets = []
    for name in candidates:
        module = modules[name]
        if name not in live:
            continue
        if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
            # peft's MultiheadAttention LoRA needs one packed q/k/v projection
            if not all_linear:
                raise ValueError(f"encoder LoRA target {name!r}: peft supports nn.MultiheadAttention "
                                 f"only with equal query/key/value widths (kdim=vdim=embed_dim)")
            logger.warning("encoder LoRA: %s (nn.MultiheadAttention with kdim/vdim) left without LoRA", name)
            continue
        targets.append(name)
    unused = [n for n in candidates if n not in live]
    if unused:
        logger.info("encoder LoRA: %d selected layers do not feed the features (e.g. %s); no LoRA there",
                    len(unused), unused[0])
    if not targets:
        raise ValueError(
            f"encoder.lora.target_modules={requested!r} selects no layer that feeds the encoder's "
            f"features (feature_layer={encoder.feature_layer}); selected but unused: {unused[:3]}"
        )
    return targets


def _live_modules(encoder: "VisionEncoder", names: list[str]) -> set[str]:
    """Which of `names` (tower submodules) the features depend on: one forward on a blank image
    whose pixels require grad, then autograd asks which recorded outputs the features reach
    back to (a module that was never called or whose output is discarded has no gradient).
    Runs on meta tensors (shapes only: ~1 s for ViT-L-14 where real compute takes ~1 min on
    a loaded 2-core CPU); falls back to real compute if an op has no meta kernel."""
    try:
        return _probe(encoder, names, meta=True)
    except (NotImplementedError, RuntimeError) as err:
        logger.debug("meta probe of the encoder failed (%s); probing with real tensors", err)
        return _probe(encoder, names, meta=False)


def _probe(encoder: "VisionEncoder", names: list[str], meta: bool) -> set[str]:
    from torch.func import functional_call

    tower = encoder.tower
    outputs: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(_module, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out) and out.requires_grad:
                outputs.append((name, out))
        return hook

    device = torch.device("meta") if meta else next(tower.parameters()).device
    state = {}
    if meta:
        named = list(encoder.named_parameters()) + list(encoder.named_buffers())
        state = {n: torch.empty_like(t, device="meta") for n, t in named}
    pixels = torch.zeros(1, 3, encoder.image_size, encoder.image_size, device=device, requires_grad=True)
    hooks = [tower.get_submodule(n).register_forward_hook(record(n)) for n in names]
    was_training = encoder.training
    encoder.eval()  # no dropout; the probe only asks which layers are reached
    try:
        with torch.enable_grad():
            features = functional_call(encoder, state, (pixels,), strict=False)
            grads = torch.autograd.grad(
                features.float().sum(), [t for _, t in outputs], allow_unused=True
            ) if outputs else []
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)
    return {name for (name, _), g in zip(outputs, grads) if g is not None}


def check_lora_scope(model: "SeeChatVLM") -> None:
    """LoRA weights may only live in modules whose mode is lora/qlora."""
    for module in model.parts:
        if model.modes.get(module) in ("lora", "qlora"):
            continue
        stray = [n for n, _ in model.part(module).named_parameters() if "lora_" in n]
        if stray:
            raise RuntimeError(
                f"LoRA weights found in {module} (mode {model.modes.get(module)!r}): {stray[:3]}"
            )


def parameter_table(model: "SeeChatVLM", lrs: dict[str, float] | None = None) -> str:
    """Trainable / frozen parameters per module, as printed at the start of training."""
    rows = [f"{'module':<8} {'mode':<7} {'trainable':>13} {'frozen':>13} {'lr':>9}"]
    for module in model.parts:
        params = list(model.part(module).parameters())
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
