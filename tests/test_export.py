"""Export to transformers' Llava and LoRA merge: the exported / merged model answers exactly like
the seechat model it came from."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from seechat import load
from seechat.cli import main
from seechat.data import encode_prompt
from seechat.tools.export import NotExpressibleError, export_llava_hf
from vlm_helpers import saved_model, shape_image

QUESTION = "What color is the shape?"


def seechat_reference(model_dir, image, max_new_tokens=6):
    model = load(model_dir)
    ids = torch.tensor([encode_prompt([{"from": "human", "value": f"<image>\n{QUESTION}"}],
                                      model.tokenizer, model.num_image_tokens)])
    pixels = model.image_transform(image).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
    tokens = model.generate(ids, pixel_values=pixels, max_new_tokens=max_new_tokens)[0]
    return ids, pixels, logits, tokens


def llava_outputs(out_dir, image, backend="pil", max_new_tokens=6):
    processor = AutoProcessor.from_pretrained(out_dir, backend=backend)
    llava = LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = llava(**inputs).logits
    tokens = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    return inputs, logits, tokens


def assert_same_as_seechat(model_dir, out_dir, backend="pil"):
    image = shape_image()
    ids, pixels, ref_logits, ref_tokens = seechat_reference(model_dir, image)
    inputs, logits, tokens = llava_outputs(out_dir, image, backend)
    assert inputs["input_ids"].tolist() == ids.tolist()  # same prompt, same <image> expansion
    if backend == "pil":
        assert torch.equal(inputs["pixel_values"], pixels)
        assert (logits - ref_logits).abs().max().item() <= 1e-4
    # seechat stops at EOS and pads; transformers stops there too
    n = min(len(ref_tokens), len(tokens))
    assert n > 0 and tokens[:n].tolist() == ref_tokens[:n].tolist()
    return ref_logits, logits


@pytest.mark.parametrize(
    "name, encoder, encoder_cfg, adapter_cfg, modes",
    [
        ("clip-lora", "hf", {}, {}, None),
        ("clip-keepcls-linear", "hf", {"keep_cls": True, "feature_layer": -1}, {"projector": "linear"},
         {"encoder": "frozen", "adapter": "full", "llm": "full"}),
        ("open_clip-encoder-lora", "open_clip", {"feature_layer": 1}, {},
         {"encoder": "lora", "adapter": "full", "llm": "lora"}),
        ("siglip-no-cls", "hf", {"pretrained": False, "name": None, "arch": "siglip", "config": {
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2}}, {}, None),
    ],
)
def test_export_matches_seechat(experts, tmp_path, name, encoder, encoder_cfg, adapter_cfg, modes):
    model_dir = saved_model(experts, tmp_path / "model", encoder=encoder, encoder_cfg=encoder_cfg,
                            adapter_cfg=adapter_cfg, modes=modes)
    out = export_llava_hf(model_dir, tmp_path / "llava")
    config = json.loads((out / "config.json").read_text())
    model = load(model_dir)
    assert config["image_token_index"] == model.image_token_id
    assert config["image_seq_length"] == model.num_image_tokens
    # "full" keeps every token: a kept CLS, or SigLIP's tokens (it has no CLS to drop)
    keeps_all = encoder_cfg.get("keep_cls", False) or encoder_cfg.get("arch") == "siglip"
    assert config["vision_feature_select_strategy"] == ("full" if keeps_all else "default")
    assert config["projector_hidden_act"] == ("linear" if adapter_cfg.get("projector") == "linear" else "gelu")
    for f in ("model.safetensors", "generation_config.json", "processor_config.json", "chat_template.jinja",
              "tokenizer.json"):
        assert (out / f).is_file(), f
    # the llava-hf Hub layout (what vLLM and transformers 4.x read; transformers 5 maps it)
    with safe_open(out / "model.safetensors", "pt") as f:
        prefixes = {".".join(k.split(".")[:2]) for k in f.keys()}
    assert prefixes == {"vision_tower.vision_model", "multi_modal_projector.linear_1",
                        "multi_modal_projector.linear_2", "language_model.model", "language_model.lm_head"}
    assert_same_as_seechat(model_dir, out)


def test_export_default_torchvision_processor_same_answer(experts, tmp_path):
    model_dir = saved_model(experts, tmp_path / "model")
    out = export_llava_hf(model_dir, tmp_path / "llava")
    ref_logits, logits = assert_same_as_seechat(model_dir, out, backend=None)
    # A different bicubic kernel: close, not equal (documented in seechat/tools/export.py).
    assert (logits - ref_logits).abs().max().item() < 1e-2


def test_export_cli_and_refusals(experts, tmp_path):
    shuffled = saved_model(experts, tmp_path / "shuffled", adapter_cfg={"pixel_shuffle": 2})
    with pytest.raises(NotExpressibleError, match="pixel_shuffle=2.*no pixel shuffle"):
        export_llava_hf(shuffled, tmp_path / "x")
    deep = saved_model(experts, tmp_path / "deep", adapter_cfg={"projector": "mlp3x_gelu"})
    with pytest.raises(NotExpressibleError, match="mlp3x_gelu"):
        export_llava_hf(deep, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))  # a refusal leaves nothing
    plain = saved_model(experts, tmp_path / "plain")
    assert main(["export", "--model", str(plain), "--to", "llava-hf", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "config.json").is_file()
    # Exporting again over an earlier export replaces it whole: no stale shard survives.
    (tmp_path / "cli" / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    export_llava_hf(plain, tmp_path / "cli")
    assert not (tmp_path / "cli" / "model-00002-of-00002.safetensors").exists()
    # A directory that is not an earlier export is refused, not emptied.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"mine exists and is not an earlier seechat output"):
        export_llava_hf(plain, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_open_clip_layerscale_folds_and_unsupported_parts_are_named(experts):
    from open_clip.transformer import LayerScale

    from seechat.tools.clip_convert import open_clip_to_clip
    from seechat.models.registry import build_encoder
    from transformers import CLIPVisionModel

    encoder = build_encoder({**experts["open_clip_encoder"], "feature_layer": -1}).eval()
    visual = encoder.tower
    for block in visual.transformer.resblocks:
        block.ls_1, block.ls_2 = LayerScale(32, 0.5), LayerScale(32, 2.0)
        block.ls_1.gamma.data.uniform_(0.2, 2.0)
    config, state = open_clip_to_clip(visual)
    clip = CLIPVisionModel(config).eval()
    clip.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = encoder(pixels)
        theirs = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    assert (ours - theirs).abs().max().item() < 1e-5

    visual.ln_pre = torch.nn.Identity()
    visual.transformer.resblocks[1].mlp.gelu = torch.nn.ReLU()
    with pytest.raises(NotExpressibleError, match=r"ln_pre is Identity.*block 1: MLP activation ReLU"):
        open_clip_to_clip(visual)


def test_merge_matches_unmerged(experts, tmp_path):
    model_dir = saved_model(experts, tmp_path / "lora", modes={"encoder": "lora", "adapter": "full", "llm": "lora"})
    assert main(["merge", "--model", str(model_dir), str(tmp_path / "merged")]) == 0
    meta = json.loads((tmp_path / "merged" / "seechat.json").read_text())
    assert set(meta["stored"]) >= {"llm", "encoder"} and "llm_lora" not in meta["stored"]
    assert "encoder_lora" not in meta["stored"]
    image = shape_image()
    _, _, ref_logits, ref_tokens = seechat_reference(model_dir, image, max_new_tokens=8)
    _, _, logits, tokens = seechat_reference(tmp_path / "merged", image, max_new_tokens=8)
    merged = load(tmp_path / "merged")
    assert not merged.llm_is_peft
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert tokens.tolist() == ref_tokens.tolist()
    # the LoRA weights matter: without them the logits differ, so the merge really folded them in
    unmerged = load(model_dir)
    ids, pixels, _, _ = seechat_reference(model_dir, image, max_new_tokens=1)
    with unmerged.llm.disable_adapter(), torch.no_grad():
        without = unmerged(ids, pixel_values=pixels).logits
    assert (without - ref_logits).abs().max().item() > 1e-3
