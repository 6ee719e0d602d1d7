"""Vision towers as transformers `CLIPVisionModel` / `SiglipVisionModel` weights, for export.

transformers towers pass through unchanged. An open_clip ViT is rewritten as a `CLIPVisionModel`
when its architecture is the one CLIP's is: conv patch embedding without bias, a class token,
one positional table, a pre-norm LayerNorm, standard pre-norm blocks (LayerNorm, multi-head
attention with biases, LayerNorm, two-layer MLP with GELU or QuickGELU). LayerScale is folded
into the output projections (exact: a per-channel scale after a linear layer is a linear
layer). Anything else raises `NotExpressibleError` listing every part that cannot be written.
Pooling, `ln_post` and `proj` are irrelevant: LLaVA reads an intermediate block's tokens.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

from seechat.errors import UserError
from seechat.models.encoders import VisionEncoder
from seechat.models.encoders.hf import HFVisionEncoder
from seechat.models.encoders.open_clip import OpenCLIPVisionEncoder


class NotExpressibleError(UserError, ValueError):
    """A part of the seechat model has no equivalent in the export target."""


def vision_tower_for_export(encoder: VisionEncoder) -> tuple[PreTrainedModel, bool]:
    """(the encoder as a transformers vision model, whether it emits a leading CLS token).
    A transformers tower is returned as is (shared, not copied)."""
    if isinstance(encoder, HFVisionEncoder) and getattr(encoder, "naflex", False):
        raise NotExpressibleError("a Siglip2 (NaFlex) tower takes patches and spatial shapes; Llava's vision "
                                  "tower takes [B, 3, H, W] pixels, so this model cannot be written as llava-hf")
    if isinstance(encoder, HFVisionEncoder):
        return encoder.tower, encoder.has_cls
    if isinstance(encoder, OpenCLIPVisionEncoder):
        config, state = open_clip_to_clip(encoder.tower)
        tower = CLIPVisionModel(config).to(next(encoder.tower.parameters()).dtype)
        tower.load_state_dict(state, strict=True)
        return tower.eval(), True
    raise NotExpressibleError(
        f"encoder {type(encoder).__name__} cannot be exported: only transformers CLIP/SigLIP "
        "towers and open_clip ViTs with CLIP's architecture can"
    )


def _act_name(act: nn.Module) -> str | None:
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_new"
    return None


def _ls_gamma(ls: nn.Module, width: int) -> torch.Tensor | None:
    """The LayerScale vector, ones for no LayerScale, None for anything else."""
    if isinstance(ls, nn.Identity):
        return torch.ones(width)
    gamma = getattr(ls, "gamma", None)
    return gamma.detach().float() if isinstance(gamma, torch.Tensor) and gamma.shape == (width,) else None


def _check_open_clip(visual: nn.Module) -> list[str]:
    """Every reason `visual` is not a CLIP ViT (empty when it is)."""
    problems = []
    size, patch = tuple(visual.image_size), tuple(visual.patch_size)
    if size[0] != size[1] or patch[0] != patch[1]:
        problems.append(f"non-square image {size} or patch {patch} (CLIPVisionModel is square)")
    if getattr(visual.conv1, "bias", None) is not None:
        problems.append("patch embedding conv1 has a bias")
    if getattr(visual, "class_embedding", None) is None:
        problems.append("no class token")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        problems.append(f"ln_pre is {type(visual.ln_pre).__name__}, not LayerNorm")
    width = visual.transformer.width
    acts = set()
    for i, block in enumerate(visual.transformer.resblocks):
        where = f"block {i}"
        if type(block).__name__ != "ResidualAttentionBlock":
            problems.append(f"{where} is {type(block).__name__} (scaled/cosine/qk-norm attention variants)")
            continue
        if not isinstance(block.attn, nn.MultiheadAttention) or block.attn.in_proj_bias is None:
            problems.append(f"{where}: attention is not nn.MultiheadAttention with biases")
        for name in ("ln_1", "ln_2"):
            if not isinstance(getattr(block, name), nn.LayerNorm):
                problems.append(f"{where}: {name} is not LayerNorm")
        for name in ("ls_1", "ls_2"):
            if _ls_gamma(getattr(block, name), width) is None:
                problems.append(f"{where}: {name} is {type(getattr(block, name)).__name__}")
        act = _act_name(block.mlp.gelu)
        if act is None:
            problems.append(f"{where}: MLP activation {type(block.mlp.gelu).__name__} (CLIP has gelu/quick_gelu)")
        acts.add(act)
    if len(acts - {None}) > 1:
        problems.append(f"blocks use different activations {sorted(acts - {None})}")
    return problems


def open_clip_to_clip(visual: nn.Module) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """An open_clip ViT's weights as a `CLIPVisionModel` state dict, with its config."""
    problems = _check_open_clip(visual)
    if problems:
        raise NotExpressibleError(
            "this open_clip tower cannot be written as a transformers CLIPVisionModel: " + "; ".join(problems)
        )
    blocks = visual.transformer.resblocks
    width, first = visual.transformer.width, blocks[0]
    norms = [visual.ln_pre] + [m for b in blocks for m in (b.ln_1, b.ln_2)]
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_act_name(first.mlp.gelu),
        layer_norm_eps=norms[0].eps,
        projection_dim=getattr(visual, "output_dim", width),
    )
    if any(n.eps != config.layer_norm_eps for n in norms):
        raise NotExpressibleError("open_clip tower's LayerNorms use different eps values")

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone().contiguous()

    p = ""  # CLIPVisionModel (transformers 5) keeps its modules at the top level
    state = {
        p + "embeddings.class_embedding": t(visual.class_embedding),
        p + "embeddings.patch_embedding.weight": t(visual.conv1.weight),
        p + "embeddings.position_embedding.weight": t(visual.positional_embedding),
        p + "pre_layrnorm.weight": t(visual.ln_pre.weight),
        p + "pre_layrnorm.bias": t(visual.ln_pre.bias),
    }
    ln_post = getattr(visual, "ln_post", None)  # unused by LLaVA; the tower still has one
    has_post = isinstance(ln_post, nn.LayerNorm)
    state[p + "post_layernorm.weight"] = t(ln_post.weight) if has_post else torch.ones(width)
    state[p + "post_layernorm.bias"] = t(ln_post.bias) if has_post else torch.zeros(width)
    for i, block in enumerate(blocks):
        q = f"{p}encoder.layers.{i}."
        attn = block.attn
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)):
            state[q + f"self_attn.{name}.weight"], state[q + f"self_attn.{name}.bias"] = t(w), t(b)
        g1, g2 = _ls_gamma(block.ls_1, width), _ls_gamma(block.ls_2, width)
        out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
        state[q + "self_attn.out_proj.weight"] = t(out_w * g1.to(out_w.dtype)[:, None])
        state[q + "self_attn.out_proj.bias"] = t(out_b * g1.to(out_b.dtype))
        state[q + "layer_norm1.weight"], state[q + "layer_norm1.bias"] = t(block.ln_1.weight), t(block.ln_1.bias)
        state[q + "layer_norm2.weight"], state[q + "layer_norm2.bias"] = t(block.ln_2.weight), t(block.ln_2.bias)
        state[q + "mlp.fc1.weight"], state[q + "mlp.fc1.bias"] = t(block.mlp.c_fc.weight), t(block.mlp.c_fc.bias)
        fc2_w, fc2_b = block.mlp.c_proj.weight, block.mlp.c_proj.bias
        state[q + "mlp.fc2.weight"] = t(fc2_w * g2.to(fc2_w.dtype)[:, None])
        state[q + "mlp.fc2.bias"] = t(fc2_b * g2.to(fc2_b.dtype))
    return config, state
