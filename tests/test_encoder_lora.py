"""Encoder LoRA reaches only layers that act: `all-linear` on an open_clip tower wraps its
nn.MultiheadAttention modules whole (not their never-called out_proj), skips blocks after the
feature layer, trains every LoRA weight, merges exactly; a dead explicit target is refused."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import image_batch, model_config
from seechat import build_model
from seechat.tools.merge import merge_tower_lora
from seechat.models.modes import encoder_lora_targets
from seechat.models.registry import build_encoder

LORA_ENCODER = {"encoder": "lora", "adapter": "frozen", "llm": "frozen"}


def open_clip_lora_model(experts, feature_layer: int, target="all-linear"):
    cfg = model_config(experts, "open_clip", "mlp", "llama")
    cfg["encoder"]["feature_layer"] = feature_layer
    cfg["encoder"]["lora"] = {"target_modules": target, "dropout": 0.0}
    return build_model(cfg, LORA_ENCODER)


def plain_encoder(experts, feature_layer: int):
    return build_encoder({**experts["open_clip_encoder"], "feature_layer": feature_layer})


def test_all_linear_open_clip_targets_attention_and_mlp_of_used_blocks(experts):
    # tiny tower: 2 blocks; feature_layer=1 (LLaVA's numbering: 0 = embeddings) reads block 0,
    # so block 1 never runs (stop_early)
    model = open_clip_lora_model(experts, feature_layer=1)
    tower = model.encoder.tower
    wrapped = [n for n, m in tower.named_modules() if isinstance(m, BaseTunerLayer)]
    assert wrapped == ["transformer.resblocks.0.attn", "transformer.resblocks.0.attn.base_layer.out_proj",
                       "transformer.resblocks.0.mlp.c_fc", "transformer.resblocks.0.mlp.c_proj"]
    assert encoder_lora_targets(plain_encoder(experts, feature_layer=1), "all-linear") == ["transformer.resblocks.0.attn", "transformer.resblocks.0.mlp.c_fc",
                       "transformer.resblocks.0.mlp.c_proj"]
    attn = model.encoder.tower.transformer.resblocks[0].attn
    assert isinstance(attn, LoraMultiheadAttention)
    lora_names = [n for n, _ in model.encoder.tower.named_parameters() if "lora_" in n]
    assert not [n for n in lora_names if "resblocks.1." in n]
    # in_proj (q/k/v) and out_proj both carry LoRA
    assert "transformer.resblocks.0.attn.lora_A.default.weight" in lora_names
    assert "transformer.resblocks.0.attn.base_layer.out_proj.lora_A.default.weight" in lora_names


def test_every_encoder_lora_weight_gets_a_gradient(experts):
    model = open_clip_lora_model(experts, feature_layer=-1)  # both blocks feed the features
    lora = {n: p for n, p in model.encoder.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert {n for n, p in model.encoder.named_parameters() if p.requires_grad} == set(lora)
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at zero, which zeroes lora_A's gradient
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model(**image_batch(model)).loss.backward()
    dead = [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert sum("attn.lora_" in n for n in lora) == 4  # in_proj A/B in each of the 2 blocks


def test_merged_attention_lora_equals_unmerged(experts):
    model = open_clip_lora_model(experts, feature_layer=-1).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pixels = torch.randn(2, 3, model.encoder.image_size, model.encoder.image_size)
    with torch.no_grad():
        lora_out = model.encoder(pixels)
        assert merge_tower_lora(model.encoder.tower) == 6  # 2 blocks x (attn, c_fc, c_proj)
        merged_out = model.encoder(pixels)
    assert not [n for n, _ in model.encoder.named_parameters() if "lora_" in n]
    assert isinstance(model.encoder.tower.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [["out_proj"], ["c_fc", "attn.out_proj"]])
def test_explicit_dead_target_is_refused(experts, target):
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.attn\.out_proj.*nn\.MultiheadAttention"):
        open_clip_lora_model(experts, feature_layer=-1, target=target)


def test_target_that_feeds_nothing_is_refused(experts):
    # feature_layer=1: only block 0 runs, so LoRA on block 1 alone could never train
    with pytest.raises(ValueError, match=r"resblocks\.1\.mlp\.c_fc"):
        open_clip_lora_model(experts, feature_layer=1, target=r"transformer\.resblocks\.1\.mlp\.c_fc")


def test_hf_tower_all_linear_skips_layers_after_the_feature_layer(experts):
    # transformers towers compute every layer; those after feature_layer (-2) are discarded
    cfg = model_config(experts, "hf", "mlp", "llama")
    cfg["encoder"]["lora"] = {"dropout": 0.0}
    model = build_model(cfg, LORA_ENCODER)
    layers = model.encoder.tower.encoder.layers
    lora = {n: p for n, p in model.encoder.named_parameters() if "lora_" in n}
    used = [f"layers.{i}." for i in range(len(layers) - 1)]
    assert lora and all(any(u in n for u in used) for n in lora)
    assert len(layers) == 2 and {n.split("layers.")[1].split(".lora_")[0] for n in lora} == {
        "0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj", "0.self_attn.out_proj",
        "0.mlp.fc1", "0.mlp.fc2"}
    with torch.no_grad():
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model(**image_batch(model)).loss.backward()
    assert not [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
