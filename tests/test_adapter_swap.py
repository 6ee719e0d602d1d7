"""Adapters swap by one line: `adapter=<card>` on the default recipe trains with no other
override, its sizes following the experts (BLIP-2's and Qwen-VL's own on the papers' experts),
a CLS token dropped where a square grid is read, and a warning when an adapter outweighs the LM."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from conftest import model_config
from seechat import load
from seechat.config import REPO_ROOT, RecipeError, load_card, load_recipe
from seechat.models.adapters import Experts
from seechat.models.kinds import build_model
from seechat.models.registry import adapter_config, build_adapter
from seechat.models.stitched import build as stitched_build
from seechat.training.loop import run

DEFAULT_RECIPE = REPO_ROOT / "recipes" / "easyvqa_align.yaml"
CARDS = sorted(p.stem for p in (REPO_ROOT / "adapters").glob("*.yaml"))
ALIGN = {"encoder": "frozen", "adapter": "full", "llm": "frozen"}


def tiny_default_recipe(experts: dict, data: dict, out: Path, *extra: str) -> dict:
    """The default recipe with its experts and data pointed at the tiny ones, 2 steps."""
    return load_recipe(DEFAULT_RECIPE, [
        f"encoder.name={experts['hf_encoder']['name']}", f"llm.name_or_path={experts['qwen2']}",
        f"data.train={data['train']}", "data.val=null", f"data.test={data['test']}",
        f"data.image_root={data['root']}", "data.num_workers=0", f"output_dir={out}",
        "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.trackers=[]",
        "train.mixed_precision=no", "train.warmup_ratio=0.0", *extra,
    ])


@pytest.mark.parametrize("card", CARDS)
def test_swapping_the_adapter_card_on_the_default_recipe_trains(card, experts, tiny_vqa, tmp_path, monkeypatch,
                                                                 caplog):
    built = {}
    check = stitched_build.warn_if_adapter_outweighs_llm

    def capture(model):  # the model the run trains, and its adapter before step one
        built["model"] = model
        built["before"] = {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}
        check(model)

    monkeypatch.setattr(stitched_build, "warn_if_adapter_outweighs_llm", capture)
    recipe = tiny_default_recipe(experts, tiny_vqa, tmp_path / "run", f"adapter={card}")
    with caplog.at_level(logging.WARNING, logger="seechat.models.stitched.build"):
        summary = run(recipe)

    curve = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) == 2 and all(math.isfinite(loss) for loss in curve)
    model = built["model"]
    after = model.adapter.state_dict()
    assert any(not torch.equal(built["before"][k], after[k]) for k in after), "the adapter did not train"
    # Every card fits beside the tiny 64-wide, 2-layer LM, so no warning is due.
    adapter_params = sum(p.numel() for p in model.adapter.parameters())
    assert adapter_params <= model.llm.num_parameters()
    assert not [r for r in caplog.records if "more than the LM's" in r.getMessage()]
    # The saved model names the sizes it was built with, none left `auto`.
    saved = json.loads((Path(summary["final"]) / "seechat.json").read_text())["model"]["adapter"]
    assert "auto" not in saved.values() and saved["type"] == load_card(card)["type"]
    assert load(summary["final"]).num_image_tokens == model.num_image_tokens


def test_the_card_sizes_follow_the_tiny_experts(experts, tiny_vqa, tmp_path):
    qformer = tiny_default_recipe(experts, tiny_vqa, tmp_path, "adapter=qformer")
    model = build_model(qformer["model"], ALIGN)
    assert model.config["adapter"] == {"type": "qformer", "num_queries": 32, "hidden_size": 64, "num_layers": 1,
                                       "num_heads": 1, "intermediate_size": 256, "cross_attention_frequency": 2}
    assert model.num_image_tokens == 32
    # An explicit width wins, and the heads and feed-forward follow it rather than the LM.
    wide = tiny_default_recipe(experts, tiny_vqa, tmp_path, "adapter=qformer", "adapter.hidden_size=128")
    assert build_model(wide["model"], ALIGN).config["adapter"]["num_heads"] == 2
    assert build_model(wide["model"], ALIGN).config["adapter"]["intermediate_size"] == 512


def test_the_resampler_drops_the_cls_token_itself(experts, tiny_vqa, tmp_path):
    # The default's SigLIP-shaped tower has no CLS; a CLIP-style recipe that keeps it:
    recipe = tiny_default_recipe(experts, tiny_vqa, tmp_path, "adapter=resampler256", "encoder.keep_cls=true")
    assert recipe["model"]["encoder"]["keep_cls"] is True
    model = build_model(recipe["model"], ALIGN)
    assert model.encoder.num_patches == 17  # 4x4 patches + CLS
    assert model.config["adapter"] == {"type": "resampler", "grid_size": 4, "embed_dim": 64, "num_heads": 1}
    assert model.num_image_tokens == 16
    features = torch.randn(2, 17, model.encoder.hidden_size)
    with torch.no_grad():
        out = model.adapter(features)
        assert out.shape == (2, 16, 64)
        assert torch.equal(out, model.adapter(features[:, 1:]))  # the CLS token is not read
        pixels = torch.randn(1, 3, model.encoder.image_size, model.encoder.image_size)
        assert model.encode_images(pixels).shape == (1, model.num_image_tokens, 64)


def test_an_adapter_larger_than_the_lm_is_named_before_step_one(experts, caplog):
    config = model_config(experts, "hf", "qformer", "qwen2")
    config["adapter"].update(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    with caplog.at_level(logging.WARNING, logger="seechat.models.stitched.build"):
        model = build_model(config, ALIGN)
    adapter = sum(p.numel() for p in model.adapter.parameters())
    llm = model.llm.num_parameters()
    assert adapter > llm
    assert [r.getMessage() for r in caplog.records if r.name == "seechat.models.stitched.build"] == [
        f"adapter qformer has {adapter:,} parameters, more than the LM's {llm:,} (num_queries=8, hidden_size=256, "
        "num_layers=4, num_heads=4, intermediate_size=1024): set smaller sizes in model.adapter, or leave them out "
        "of the recipe to follow the LM"
    ]


# (vision width, patch grid, LM width, LM layers) of the papers' experts
BLIP2_OPT_2_7B = Experts(1408, (16, 16), 2560, 32)      # EVA ViT-g/14 at 224 px, OPT-2.7B
BLIP2_FLANT5_XL = Experts(1408, (16, 16), 2048, 24)     # ... FlanT5-XL
QWEN_VL_448 = Experts(1664, (32, 32), 4096, 32)         # ViT-bigG/14 at 448 px, Qwen-7B
QWEN_VL_224 = Experts(1664, (16, 16), 4096, 32)         # ... at 224 px (pretraining)


@pytest.mark.parametrize("experts", [BLIP2_OPT_2_7B, BLIP2_FLANT5_XL])
def test_the_qformer_card_is_blip2s_on_blip2s_experts(experts):
    cfg = adapter_config(load_card("qformer"), experts)
    assert cfg == {"type": "qformer", "num_queries": 32, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                   "intermediate_size": 3072, "cross_attention_frequency": 2}
    with torch.device("meta"):
        adapter = build_adapter(cfg, experts.vision_width, experts.llm_width)
    assert adapter.num_tokens(257) == 32
    assert adapter.qformer.config.num_hidden_layers == 12 and adapter.qformer.config.hidden_size == 768


@pytest.mark.parametrize("experts", [QWEN_VL_448, QWEN_VL_224])
def test_the_resampler_card_is_qwen_vls_on_qwen_vls_experts(experts):
    cfg = adapter_config(load_card("resampler256"), experts)
    assert cfg == {"type": "resampler", "grid_size": 16, "embed_dim": 4096, "num_heads": 32}
    with torch.device("meta"):
        adapter = build_adapter(cfg, experts.vision_width, experts.llm_width)
    side = experts.grid[0]
    assert adapter.num_tokens(side * side) == 256 and adapter.num_tokens(side * side + 1) == 256
    assert adapter.attn.num_heads == 32 and adapter.query.shape == (256, 4096)


def test_auto_is_refused_where_an_adapter_derives_nothing(tmp_path):
    with pytest.raises(RecipeError, match=r"^model\.adapter\.num_queries=auto: adapter type 'qformer' derives "
                                          r"only these keys from the experts: hidden_size, num_layers, num_heads, "
                                          r"intermediate_size; set num_queries to a value$"):
        load_recipe(DEFAULT_RECIPE, ["adapter=qformer", "adapter.num_queries=auto"])
    with pytest.raises(ValueError, match=r"adapter\.hidden_size=auto is derived from the experts"):
        build_adapter(load_card("qformer"), 32, 64)
