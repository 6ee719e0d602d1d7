"""Training-memory estimate of a recipe, per module, without downloading anything.

`seechat estimate --config recipe.yaml [--dtype bf16] [--batch N]` prints, for the encoder,
the adapter and the LLM: weights, gradients, optimizer state (AdamW: two moments per trainable
parameter) and saved activations, plus the transient peaks (the encoder's hidden-state tuple,
one chunk of LM-head logits) and the total.

Parameter counts are exact: the modules are built on the meta device from their configs. A
config comes from a local path, the recipe (`llm.config`, `encoder.config`), open_clip's
built-in model configs, or, for Hub names that cannot be reached, `KNOWN_CONFIGS`
(seechat/tools/known_configs.py: Vicuna-7B/13B, Llama-2-7B, Qwen2.5, CLIP ViT-L/14(-336)); the
output says which was used.

Activations follow what autograd saves per token and layer (see `_decoder_layer_bytes`):
norm inputs, attention q/k/v/output, the MLP's intermediates, the inputs of linear layers whose
weights train, LoRA's dropout masks and inputs; with gradient checkpointing only each layer's
input plus one layer's recomputation. Under autocast, every linear weight on the backward path
is held as a compute-dtype copy until backward.

The total is the peak of live tensors: weights + optimizer state + the larger of
  * the forward peak: all saved activations plus the largest transient (the LM head's chunk:
    the logits in the compute dtype, their fp32 copy and fp32 log-softmax, which alive together
    are its peak (the log-softmax then becomes the gradient in place and is cast to the compute
    dtype); the head weight's compute-dtype copy and, when the head trains, its fp32 gradient
    accumulator; see seechat/models/loss.py). Gradients are not there: zero_grad(set_to_none) frees
    them after every update, so they count here only with train.grad_accum > 1;
  * the end of the backward: every gradient, no activation.
Measured with torch.profiler on the benchmark's five configurations this live-tensor peak is
within 5% of the real one (the peak is always in the LM head of a forward).

`device="cpu"` adds one CPU-only term, allocator behaviour rather than tensors: glibc's heap
keeps about one step's activations as free-but-resident blocks (see `_cpu_heap_retention`),
e.g. 472 MB of free heap next to 991 MB of live tensors at the align benchmark's peak. A GPU
estimate does not include it (PyTorch's CUDA caching allocator reuses its blocks by size). The
CPU estimate is checked against measured peak RSS by benchmarks/estimate.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seechat.models.loss import DEFAULT_CHUNK
from seechat.tools.known_configs import KNOWN_CONFIGS

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax


@dataclass
class ModuleEstimate:
    """Bytes of one module; `source` says where its config came from."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    transient: float = 0.0  # short-lived peak inside the module's forward/backward
    params: int = 0
    trainable: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def resident(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


# ----------------------------------------------------------------------------- configs
def _config_dict(name: str | None, inline: dict | None, kind: str) -> tuple[dict, str]:
    """(config as a dict, where it came from) for an LLM or HF vision tower."""
    from transformers import AutoConfig

    if inline:
        return dict(inline), "recipe config"
    if name and Path(name).expanduser().is_dir():
        cfg = AutoConfig.from_pretrained(name)
        if kind == "vision" and hasattr(cfg, "vision_config"):
            cfg = cfg.vision_config
        return cfg.to_dict(), f"local config {name}"
    if name in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[name]), f"built-in table ({name}; Hub not consulted)"
    try:
        cfg = AutoConfig.from_pretrained(name)
    except Exception as err:  # offline, gated, misspelt: all end here with one actionable message
        raise ValueError(
            f"no config for {kind} {name!r}: not a local directory, not in the built-in table "
            f"({', '.join(sorted(KNOWN_CONFIGS))}) and the Hub gave: {err}. Point the recipe at a "
            "local copy or give the architecture inline (llm.config / encoder.config)."
        ) from None
    if kind == "vision" and hasattr(cfg, "vision_config"):
        cfg = cfg.vision_config
    return cfg.to_dict(), f"Hub config {name}"


def _vision_config(enc: dict) -> tuple[dict, str]:
    """A CLIP/SigLIP-vision config dict for any encoder entry (open_clip mapped to CLIP's)."""
    if enc.get("backend", "open_clip") == "open_clip":
        import open_clip

        base = open_clip.get_model_config(enc["name"])
        if base is None:
            raise ValueError(f"open_clip has no model config {enc['name']!r}")
        vc = {**base["vision_cfg"], **(enc.get("config") or {}).get("vision_cfg", {})}
        width = vc["width"]
        return {"model_type": "clip_vision_model", "hidden_size": width,
                "intermediate_size": int(width * vc.get("mlp_ratio", 4.0)), "num_hidden_layers": vc["layers"],
                "num_attention_heads": width // vc.get("head_width", 64), "image_size": vc["image_size"],
                "patch_size": vc["patch_size"]}, f"open_clip built-in config {enc['name']}"
    if not enc.get("pretrained"):
        return {"model_type": f"{enc.get('arch') or 'clip'}_vision_model", **(enc.get("config") or {})}, "recipe config"
    cfg, source = _config_dict(enc.get("name"), None, "vision")
    return cfg, source


def _meta_module(build) -> nn.Module:
    with torch.device("meta"):
        return build()


# ----------------------------------------------------------------------------- activations
def _decoder_layer_bytes(h: int, i: int, kv: int, r: int, a: int, mode: str, lora: dict | None,
                         mlp_mats: int = 3, device: str = "cuda") -> float:
    """Bytes autograd keeps per token for one pre-norm decoder layer (Llama/Qwen2 layout;
    `mlp_mats=2` for a GELU MLP such as CLIP's). r: residual-stream bytes, a: compute bytes."""
    cast = r != a
    saved = 2 * r * h  # the two norm inputs
    saved += a * (h + 2 * kv) + a * h  # sdpa: q, k, v, output
    saved += a * i * (3 if mlp_mats == 3 else 1)  # gate/act/up (GELU: the fc1 output)
    if mode == "full":
        saved += a * h * (3 if cast else 1)  # q, k, v inputs (each op casts its own copy)
        saved += a * h  # o_proj input
        saved += a * h * ((2 if mlp_mats == 3 else 1) if cast else 1)  # MLP input(s)
        saved += a * i  # down/fc2 input
        saved += 2 * r * h  # normalised outputs, for the norm weights' gradients
    if mode in ("lora", "qlora"):
        per_target_in = 4 * h + (mlp_mats - 1) * h + i  # q k v o, gate/up (or fc1), down (fc2)
        # LoRA's input, cast for lora_A, and its dropout's record: a bool mask on CUDA (fused
        # kernel), the float noise itself on the CPU (peft casts the input to the fp32 LoRA weights)
        noise = ((lora or {}).get("dropout", 0.05) > 0) * (1 if device == "cuda" else 4)
        saved += per_target_in * (a + noise)
        saved += (lora or {}).get("r", 8) * a * (4 + mlp_mats)
    return saved


@dataclass
class Shape:
    batch: int
    tokens: int  # per sample, LM sequence length
    supervised: int  # per sample
    images: int  # per sample


def estimate(recipe: dict, dtype: str | None = None, batch: int | None = None, seq_len: int | None = None,
             supervised: int | None = None, device: str = "cuda") -> dict[str, Any]:
    """Per-module estimate (bytes) of training `recipe` on `device` ("cuda" or "cpu"). `dtype`:
    weight storage dtype (default: each module's `dtype` key, else fp32); compute dtype: the
    run's mixed precision."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from seechat.models.kinds import stage_modes
    from seechat.models.registry import Experts, adapter_config, build_adapter

    mcfg, tcfg = recipe["model"], recipe["train"]
    modes = stage_modes(recipe["stage"], mcfg)
    mp = tcfg.get("mixed_precision", "auto")
    weight_name = {"encoder": dtype or mcfg["encoder"].get("dtype") or "fp32",
                   "llm": dtype or mcfg["llm"].get("dtype") or "fp32"}
    wbytes = {k: DTYPE_BYTES[v] for k, v in weight_name.items()}
    a = 4 if mp in ("no", None, False) else 2  # auto resolves to bf16 on a GPU / a bf16 CPU

    # --- encoder
    vcfg, vsource = _vision_config(mcfg["encoder"])
    vcfg = {k: v for k, v in vcfg.items() if k not in ("model_type", "transformers_version", "architectures")}
    tower = _meta_module(lambda: CLIPVisionModel(CLIPVisionConfig(**vcfg)))
    vc = tower.config
    grid = vc.image_size // vc.patch_size
    n_patches = grid * grid + (1 if mcfg["encoder"].get("keep_cls") else 0)
    enc = _weights(tower, modes["encoder"], wbytes["encoder"], mcfg["encoder"].get("lora"))
    enc.source = vsource

    # --- LLM
    lcfg = mcfg["llm"]
    cfg_dict, lsource = _config_dict(lcfg.get("name_or_path"), lcfg.get("config"), "llm")
    cfg_dict = dict(cfg_dict)
    model_type = cfg_dict.pop("model_type")
    for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        cfg_dict.pop(k, None)
    lm_config = AutoConfig.for_model(model_type, **cfg_dict)
    lm = _meta_module(lambda: AutoModelForCausalLM.from_config(lm_config))
    llm = _weights(lm, modes["llm"], wbytes["llm"], lcfg.get("lora"), qlora=modes["llm"] == "qlora")
    llm.source = lsource

    # --- adapter (built on meta from its card; sizes it leaves `auto` derived as the build does)
    experts = Experts(vc.hidden_size, (grid, grid), lm_config.hidden_size, lm_config.get_text_config().num_hidden_layers)
    adapter_cfg = adapter_config(mcfg["adapter"], experts)
    adapter_module = _meta_module(lambda: build_adapter(adapter_cfg, vc.hidden_size, lm_config.hidden_size))
    adp = _weights(adapter_module, modes["adapter"], 4, None)
    adp.source = f"adapter {mcfg['adapter'].get('type')}"
    image_tokens = adapter_module.num_tokens(n_patches)

    # --- shape of a batch
    b = batch or tcfg["batch_size"]
    text = 128
    tokens = seq_len or min(recipe["data"].get("max_length") or 2048, image_tokens + text)
    sup = supervised if supervised is not None else max(1, (tokens - image_tokens) // 2)
    shape = Shape(b, tokens, sup, 1)

    _encoder_activations(enc, vc, mcfg["encoder"], modes["encoder"], wbytes["encoder"], a, shape, device)
    # adapter: its input, hidden and output per image token (when it trains)
    if modes["adapter"] == "full":
        enc_feat = b * shape.images * n_patches * vc.hidden_size * a
        adp.activations = enc_feat + b * shape.images * image_tokens * lm_config.hidden_size * 2 * a
    kept_head_copy = _llm_activations(llm, lm, lcfg, modes, wbytes["llm"], a, shape, device)

    out = {"encoder": enc, "adapter": adp, "llm": llm}
    return {"modules": out, "modes": modes, "image_tokens": image_tokens, "shape": shape,
            "weight_dtype": weight_name, "compute_bytes": a,
            **_peaks(out, int(tcfg.get("grad_accum") or 1), kept_head_copy, device,
                     b * tokens * lm_config.hidden_size * min(a, 4 if modes["llm"] == "qlora" else wbytes["llm"]))}


def _encoder_activations(enc: "ModuleEstimate", vc: Any, ecfg: dict, mode: str, rv: int, a: int, shape: "Shape",
                         device: str) -> None:
    """Frozen: no graph, the hidden-state tuple is the transient peak; trained: every layer's saved tensors."""
    n_tok_v = (vc.image_size // vc.patch_size) ** 2 + 1
    hidden_tuple = (vc.num_hidden_layers + 1) * n_tok_v * vc.hidden_size * max(rv, a if a < rv else rv)
    enc.transient = shape.batch * shape.images * hidden_tuple
    if mode != "frozen":
        per = _decoder_layer_bytes(vc.hidden_size, vc.intermediate_size, vc.hidden_size, rv, a,
                                   mode, ecfg.get("lora"), mlp_mats=2, device=device)
        enc.activations = shape.batch * shape.images * n_tok_v * per * vc.num_hidden_layers


def _llm_activations(llm: "ModuleEstimate", lm: nn.Module, lcfg: dict, modes: dict[str, str], wbytes: int, a: int,
                     shape: "Shape", device: str) -> float:
    """The LM's saved activations and its head's transient peak; returns the bytes of the frozen
    head's compute-dtype copy that stays for the run."""
    lm_config = lm.config
    h, i_ = lm_config.hidden_size, lm_config.intermediate_size
    heads = lm_config.num_attention_heads
    kv = (getattr(lm_config, "num_key_value_heads", None) or heads) * (h // heads)
    r = 4 if modes["llm"] == "qlora" else wbytes  # QLoRA keeps norms/embeddings in fp32
    lm_mode = modes["llm"]
    b, sup = shape.batch, shape.supervised
    n_tok = b * shape.tokens
    if lm_mode == "frozen" and modes["adapter"] == "frozen" and modes["encoder"] == "frozen":
        llm.activations = 0.0
    elif lcfg.get("gradient_checkpointing"):
        per = _decoder_layer_bytes(h, i_, kv, r, a, lm_mode, lcfg.get("lora"), device=device)
        llm.activations = n_tok * r * h * lm_config.num_hidden_layers + n_tok * per
        llm.notes.append("gradient checkpointing: layer inputs + one layer recomputed")
    else:
        per = _decoder_layer_bytes(h, i_, kv, r, a, lm_mode, lcfg.get("lora"), device=device)
        llm.activations = n_tok * per * lm_config.num_hidden_layers
    llm.activations += n_tok * r * h * 2  # embeddings out, final norm in
    # Under autocast the compute-dtype copy of each linear weight stays saved for backward.
    if a < wbytes and lm_mode != "qlora" and not lcfg.get("gradient_checkpointing"):
        linear = sum(m.weight.numel() for n, m in lm.named_modules()
                     if isinstance(m, nn.Linear) and m is not lm.get_output_embeddings())
        llm.activations += linear * a
        llm.notes.append("autocast keeps a bf16 copy of each linear weight until backward")
    # LM head (seechat/models/loss.py, one chunk of rows at a time): the logits in the compute dtype,
    # their fp32 copy and its log-softmax (the chunk's peak; the log-softmax is then turned into
    # the gradient in place, and the logits freed before it is cast to the compute dtype); the
    # head weight cast to the compute dtype; in full mode the fp32 head-gradient accumulator;
    # the gathered supervised hidden rows and their gradient.
    vocab = lm.get_output_embeddings().weight.shape[0]
    rows = min(b * sup, DEFAULT_CHUNK)
    head_w = r if lm_mode == "qlora" else wbytes
    head_copy = vocab * h * a if a < head_w else 0
    llm.transient = (rows * vocab * (2 * 4 + (a if a < 4 else 0)) + head_copy
                     + (vocab * h * 4 if lm_mode == "full" else 0) + b * sup * h * (r + r))
    # A frozen head's copy is made once and kept for the run (loss.reuse_frozen_head_casts), so
    # it is also there at the end of the backward.
    return head_copy if lm_mode != "full" else 0


def _peaks(out: dict[str, "ModuleEstimate"], accum: int, kept_head_copy: float, device: str,
           smallest_activation_tensor: float) -> dict[str, float]:
    """The run's peak: persistent state plus the larger of the forward peak and the end of the backward."""
    persistent = sum(m.weights + m.optimizer for m in out.values())
    grads = sum(m.gradients for m in out.values())
    activations = sum(m.activations for m in out.values())
    # zero_grad(set_to_none) frees the gradients after each update, so the forward peak (all
    # activations plus the largest transient) sees them only while accumulating micro-batches.
    forward_peak = activations + max(m.transient for m in out.values()) + (grads if accum > 1 else 0)
    backward_end = grads + kept_head_copy  # every gradient present, every activation freed
    heap = _cpu_heap_retention(activations, smallest_activation_tensor) if device == "cpu" else 0.0
    return {"total": persistent + max(forward_peak, backward_end) + heap, "cpu_heap": heap,
            "forward_peak": forward_peak, "backward_end": backward_end, "persistent": persistent}


GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc


def _cpu_heap_retention(activations: float, smallest_activation_tensor: float) -> float:
    """Free-but-resident glibc heap under the CPU peak (0 when activation tensors are mmapped).

    glibc's dynamic mmap threshold rises to the size of each freed mmapped block (at most 32 MiB),
    so after the first step every tensor under 32 MiB comes from the brk heap; the heap is only
    trimmed from its top, which small long-lived blocks pin. A step frees its activations in the
    backward while gradients and backward temporaries are allocated between them, and the next
    forward's activations do not fit back into those holes: malloc_info at the peak of the align
    benchmark shows 472 MB of free heap in 109 blocks of 0.5-8 MB, next to 468 MB of activations.
    So about one step's activations stay resident as free heap. Tensors of 32 MiB and more are
    mmapped and returned on free: when even the smallest activation tensor (tokens x hidden)
    reaches that size, the activations leave no heap behind."""
    return activations if smallest_activation_tensor < GLIBC_MMAP_THRESHOLD_MAX else 0.0


def _weights(module: nn.Module, mode: str, wbytes: int, lora: dict | None, qlora: bool = False) -> ModuleEstimate:
    """Weights, gradients and AdamW state of `module` (meta) trained in `mode`."""
    est = ModuleEstimate()
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and m is not head]
    params = sum(p.numel() for p in module.parameters())
    linear_w = sum(m.weight.numel() for m in linears)
    est.params = params
    if qlora:  # 4-bit linear weights; everything else upcast to fp32 by prepare_model_for_kbit_training
        est.weights = linear_w * NF4_BYTES + (params - linear_w) * 4
    else:
        est.weights = params * wbytes
    if mode in ("lora", "qlora"):
        r = (lora or {}).get("r", 8)
        lora_params = sum(r * (m.in_features + m.out_features) for m in linears)
        est.trainable = lora_params
        est.weights += lora_params * 4
        est.gradients = lora_params * 4
        est.optimizer = lora_params * 8
    elif mode == "full":
        est.trainable = params
        est.gradients = params * wbytes
        est.optimizer = 2 * params * wbytes
    return est


def format_estimate(result: dict[str, Any]) -> str:
    """The table `seechat estimate` prints (GiB)."""
    gib = 1024**3
    rows = [f"{'module':<8} {'mode':<7} {'params':>14} {'weights':>9} {'grads':>9} {'optim':>9} "
            f"{'activ.':>9} {'transient':>9}  config source"]
    for name, m in result["modules"].items():
        rows.append(f"{name:<8} {result['modes'][name]:<7} {m.params:>14,} {m.weights / gib:>9.2f} "
                    f"{m.gradients / gib:>9.2f} {m.optimizer / gib:>9.2f} {m.activations / gib:>9.2f} "
                    f"{m.transient / gib:>9.2f}  {m.source}")
    s = result["shape"]
    rows.append(f"total (GiB, peak transient included): {result['total'] / gib:.2f}   batch {s.batch} x "
                f"{s.tokens} tokens ({result['image_tokens']} image, {s.supervised} supervised per sample); "
                f"weights {result['weight_dtype']}, compute {'bf16' if result['compute_bytes'] == 2 else 'fp32'}")
    notes = [n for m in result["modules"].values() for n in m.notes]
    rows += [f"note: {n}" for n in notes]
    return "\n".join(rows)


def fits(result: dict[str, Any], gib: float) -> bool:
    return result["total"] <= gib * 1024**3 and not math.isnan(result["total"])
