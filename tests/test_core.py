"""Core library: every adapter x both encoder backends x two LLM architectures; modes; QLoRA;
the resampler's positions; the placeholder check; save/load; cached generation."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import image_batch, model_config
from seechat import build_model, load
from seechat.models.adapters import MLPAdapter, ResamplerAdapter, sincos_2d
from seechat.models.registry import build_adapter, build_encoder

ALIGN = {"encoder": "frozen", "adapter": "full", "llm": "frozen"}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def step(model, batch, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return loss


def test_parameters_walk_the_parts_in_their_declared_order(experts):
    """`parameters()` (what gradient clipping and the guard's norm sum over) lists the parts in
    the order the kind declares them: with the LM registered first the grad norm's last bit
    changed, a clipped step with it, and the default's finetune answered 8 questions differently."""
    model = build_model(model_config(experts), {"encoder": "frozen", "adapter": "full", "llm": "full"})
    assert [name for name, _ in model.named_children()] == list(model.parts) == ["encoder", "adapter", "llm"]
    order = [name.split(".")[0] for name, _ in model.named_parameters()]
    assert order == sorted(order, key=list(model.parts).index)


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
@pytest.mark.parametrize("encoder", ["hf", "open_clip"])
@pytest.mark.parametrize("adapter", ["mlp", "qformer", "resampler"])
def test_every_combination_trains_only_what_modes_allow(experts, adapter, encoder, llm):
    cfg = model_config(experts, encoder, adapter, llm, lora={"target_modules": ["q_proj", "v_proj"]})
    modes = {"encoder": "frozen", "adapter": "full", "llm": "lora"}
    model = build_model(cfg, modes)
    expected_tokens = {"mlp": model.encoder.num_patches, "qformer": 8, "resampler": 16}[adapter]
    assert model.num_image_tokens == expected_tokens
    batch = image_batch(model)
    adapted = model.encode_images(batch["pixel_values"])
    assert adapted.shape == (1, expected_tokens, model.llm.get_input_embeddings().embedding_dim)

    before = snapshot(model)
    loss = step(model, batch)
    assert torch.isfinite(loss)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    assert any(n.startswith("adapter.") for n in changed)
    assert any(n.startswith("llm.") and "lora_" in n for n in changed)
    assert not any(n.startswith("encoder.") for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("llm."))


@pytest.mark.parametrize("encoder", ["hf", "open_clip"])
def test_full_and_lora_encoder_modes(experts, encoder):
    cfg = model_config(experts, encoder, "mlp", "qwen2")
    target = ["q_proj", "v_proj"] if encoder == "hf" else ["c_fc"]
    cfg["encoder"]["lora"] = {"target_modules": target}
    for enc_mode in ("full", "lora"):
        model = build_model(cfg, {"encoder": enc_mode, "adapter": "frozen", "llm": "full"})
        before = snapshot(model)
        step(model, image_batch(model))
        after = snapshot(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert not any(n.startswith("adapter.") for n in changed)
        enc_changed = [n for n in changed if n.startswith("encoder.")]
        assert enc_changed
        if enc_mode == "lora":
            assert all("lora_" in n for n in enc_changed)
        assert any(n.startswith("llm.") for n in changed)


def test_llm_lora_never_reaches_the_vision_tower(experts):
    # CLIP's attention uses q_proj/v_proj too: an LLM LoRA target list must not touch it.
    cfg = model_config(experts, "hf", "mlp", "llama", lora={"target_modules": ["q_proj", "v_proj"]})
    model = build_model(cfg, {"encoder": "frozen", "adapter": "full", "llm": "lora"})
    assert not [n for n, _ in model.encoder.named_parameters() if "lora_" in n]
    assert [n for n, _ in model.llm.named_parameters() if "lora_" in n]


def test_qlora_is_4bit_and_trains_lora(experts):
    import bitsandbytes as bnb

    cfg = {
        "encoder": dict(experts["hf_encoder"]),
        "adapter": {"type": "mlp", "projector": "linear"},
        "llm": {"name_or_path": experts["llama256"], "lora": {"target_modules": ["q_proj", "v_proj"]}},
    }
    model = build_model(cfg, {"encoder": "frozen", "adapter": "full", "llm": "qlora"})
    linears = [m for n, m in model.base_llm.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers = model.base_llm.config.num_hidden_layers
    assert len(linears) == 7 * layers  # q k v o gate up down in every layer
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in linears)
    # An eval-mode pass without grad first (validation, generation): on AVX512-BF16 CPUs
    # bitsandbytes would repack the 4-bit weights for inference and cut every LoRA's gradient.
    model.eval()
    with torch.no_grad():
        model(**image_batch(model))
    model.train()
    loss = model(**image_batch(model)).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)

    seen, quant_bytes, bf16_bytes = set(), 0, 0
    for m in linears:
        qs = m.weight.quant_state
        tensors = [m.weight, qs.absmax, qs.code, qs.state2.absmax, qs.state2.code]
        for t in tensors:  # code tables are shared between layers: count each once
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                quant_bytes += t.numel() * t.element_size()
        bf16_bytes += math.prod(qs.shape) * 2
    assert quant_bytes <= 0.35 * bf16_bytes, (quant_bytes, bf16_bytes)


@pytest.mark.parametrize("n_patches", [16, 64, 1024])
def test_resampler_always_emits_256_tokens(n_patches):
    adapter = ResamplerAdapter(in_dim=48, out_dim=64, grid_size=16)
    out = adapter(torch.randn(2, n_patches, 48))
    assert out.shape == (2, 256, 64)
    assert adapter.num_tokens(n_patches) == 256


@pytest.mark.parametrize("cls", [0, 1])
def test_pixel_shuffle_folds_each_2x2_block_into_one_token(cls):
    # A 4x4 grid whose patch (r, c) holds the number 10*r + c, so every output row can be read.
    grid = torch.tensor([[10.0 * r + c for c in range(4)] for r in range(4)]).reshape(1, 16, 1)
    features = torch.cat([torch.full((1, cls, 1), -1.0), grid], dim=1)
    adapter = MLPAdapter(in_dim=1, out_dim=8, projector="linear", pixel_shuffle=2)
    assert adapter.num_tokens(16 + cls) == 4 + cls
    folded = adapter.shuffle(features)[0, :, :].tolist()
    blocks = [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
    assert folded == [[-1.0] * 4] * cls + [[float(v) for v in b] for b in blocks]
    assert adapter(features).shape == (1, 4 + cls, 8)
    with pytest.raises(ValueError, match="pixel_shuffle=2 needs a square patch grid.*gives 10 tokens"):
        adapter.num_tokens(10)
    with pytest.raises(ValueError, match="pixel_shuffle=3 needs.*gives 16 tokens"):
        MLPAdapter(in_dim=1, out_dim=8, pixel_shuffle=3).num_tokens(16)
    with pytest.raises(ValueError, match="gives 1 tokens"):  # a lone token is no grid (with or without CLS)
        adapter.num_tokens(1)


def test_pixel_shuffle_from_a_recipe_sets_the_image_token_count(experts):
    config = model_config(experts, "hf", "mlp", "llama")
    config["adapter"]["pixel_shuffle"] = 2
    model = build_model(config, ALIGN)
    assert model.encoder.num_patches == 16 and model.num_image_tokens == 4
    batch = image_batch(model)
    assert torch.isfinite(model(**batch).loss)


def test_an_unreadable_patch_grid_fails_when_the_model_is_built(experts):
    # (a resampler reads 4x4 patches after a CLS token too: tests/test_adapter_swap.py)
    config = model_config(experts, "hf", "mlp", "llama")
    config["adapter"]["pixel_shuffle"] = 3
    with pytest.raises(ValueError, match="pixel_shuffle=3 needs a square patch grid whose side it divides"):
        build_model(config, ALIGN)


def test_resampler_position_table_matches_closed_form():
    dim, h, w = 16, 3, 5
    table = sincos_2d(dim, h, w)
    quarter = dim // 4
    for y in range(h):
        for x in range(w):
            row = table[y * w + x]
            for i in range(quarter):
                freq = 10000 ** (-i / quarter)
                assert row[i].item() == pytest.approx(math.sin(y * freq), abs=1e-6)
                assert row[quarter + i].item() == pytest.approx(math.cos(y * freq), abs=1e-6)
                assert row[2 * quarter + i].item() == pytest.approx(math.sin(x * freq), abs=1e-6)
                assert row[3 * quarter + i].item() == pytest.approx(math.cos(x * freq), abs=1e-6)
    adapter = ResamplerAdapter(in_dim=8, out_dim=dim, grid_size=4)
    assert torch.equal(adapter.pos_embed, sincos_2d(dim, 4, 4))
    assert torch.allclose(adapter.key_positions(4), adapter.pos_embed)  # same grid: no resize
    assert adapter.key_positions(8).shape == (64, dim)
    with pytest.raises(ValueError, match="square patch grid .*got 18 patch tokens"):
        adapter(torch.randn(1, 18, 8))


def test_placeholder_count_mismatch_names_sample_and_counts(experts):
    model = build_model(model_config(experts), ALIGN)
    batch = image_batch(model)
    n = model.num_image_tokens
    ids = batch["input_ids"].clone()
    ids[0, 3] = 10  # one placeholder fewer in sample "cat-7"
    with pytest.raises(ValueError, match=rf"sample cat-7: {n - 1} <image> placeholder tokens .* {n} image embeddings"):
        model(ids, pixel_values=batch["pixel_values"], num_images=batch["num_images"], sample_ids=["cat-7", "dog-2"])
    with pytest.raises(ValueError, match=r"sample batch index 0: .* 0 image\(s\)"):
        model(batch["input_ids"], pixel_values=None, num_images=torch.tensor([0, 0]))


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"]).logits


def _dir_bytes(path, suffix=".safetensors"):
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffix)
    )


@pytest.mark.parametrize(
    "modes",
    [
        {"encoder": "frozen", "adapter": "full", "llm": "frozen"},
        {"encoder": "frozen", "adapter": "full", "llm": "lora"},
        {"encoder": "lora", "adapter": "full", "llm": "full"},
    ],
    ids=["align", "lora", "full"],
)
def test_save_load_gives_identical_logits(experts, tmp_path, modes):
    cfg = model_config(experts, "hf", "resampler", "qwen2", lora={"target_modules": ["q_proj", "v_proj"]})
    cfg["encoder"]["lora"] = {"target_modules": ["q_proj"]}
    model = build_model(cfg, modes)
    batch = image_batch(model)
    step(model, batch)  # move trained weights away from their init
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = load(tmp_path / "saved")
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))
    assert loaded.modes == modes
    assert not any(p.requires_grad for p in loaded.parameters())


def test_saving_replaces_an_earlier_save_but_never_an_unrelated_directory(experts, tmp_path):
    model = build_model(model_config(experts), ALIGN)
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "stale.safetensors").write_bytes(b"old")
    model.save_pretrained(tmp_path / "saved")  # over an earlier save: replaced whole
    assert not (tmp_path / "saved" / "stale.safetensors").exists()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"home exists and is not an earlier seechat output \(no seechat.json"):
        model.save_pretrained(tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "seechat.json").is_file()


def test_frozen_llm_lora_save_holds_no_llm_weights(experts, tmp_path):
    cfg = model_config(experts, "hf", "mlp", "llama", lora={"target_modules": ["q_proj", "v_proj"]})
    model = build_model(cfg, {"encoder": "frozen", "adapter": "full", "llm": "lora"})
    model.save_pretrained(tmp_path / "saved")
    llm_bytes = _dir_bytes(experts["llama"])
    saved = tmp_path / "saved"
    assert not (saved / "llm").exists() and not (saved / "encoder.safetensors").exists()
    lora_bytes = _dir_bytes(saved / "llm_lora")
    assert lora_bytes < 0.1 * llm_bytes, (lora_bytes, llm_bytes)
    assert _dir_bytes(saved) < 0.25 * llm_bytes


@pytest.mark.parametrize("adapter", ["mlp", "resampler"])
def test_cached_generation_equals_uncached(experts, adapter):
    model = build_model(model_config(experts, "open_clip", adapter, "llama"), ALIGN).eval()
    img, n = model.image_token_id, model.num_image_tokens
    pad = model.tokenizer.pad_token_id
    # left-padded batch: an image prompt, a shorter text-only prompt
    a = [10, 11] + [img] * n + [12, 13]
    b = [pad] * (len(a) - 3) + [14, 15, 16]
    ids = torch.tensor([a, b])
    mask = (ids != pad).long()
    pv = torch.randn(1, 3, model.encoder.image_size, model.encoder.image_size)
    kwargs = dict(pixel_values=pv, num_images=torch.tensor([1, 0]), max_new_tokens=12, eos_token_id=[-1])
    flags = [p.requires_grad for p in model.parameters()]
    cached = model.generate(ids, mask, use_cache=True, **kwargs)
    plain = model.generate(ids, mask, use_cache=False, **kwargs)
    assert [p.requires_grad for p in model.parameters()] == flags  # generate restores what it flips
    assert cached.shape == (2, 12)
    assert torch.equal(cached, plain)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(ids, mask, use_cache=True, do_sample=True, top_k=20, top_p=0.9, generator=g1, **kwargs)
    s2 = model.generate(ids, mask, use_cache=False, do_sample=True, top_k=20, top_p=0.9, generator=g2, **kwargs)
    assert torch.equal(s1, s2)
    # a text-only prompt alone gives the same tokens as in the padded batch
    alone = model.generate(ids[1:, -3:], None, max_new_tokens=12, eos_token_id=[-1])
    assert torch.equal(alone[0], cached[1])


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid adapter types: mlp, qformer, resampler"):
        build_adapter({"type": "perceiver"}, 8, 8)
    with pytest.raises(ValueError, match="valid encoder backends: hf, open_clip"):
        build_encoder({"backend": "timm", "name": "x"})
    with pytest.raises(ValueError, match="mlp<N>x_gelu"):
        build_adapter({"type": "mlp", "projector": "mlp2x_relu"}, 8, 8)


def test_hf_encoder_reads_the_penultimate_layer_without_cls(experts):
    from transformers import CLIPVisionModel

    encoder = build_encoder(experts["hf_encoder"])
    reference = CLIPVisionModel.from_pretrained(experts["hf_encoder"]["name"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(encoder(x), expected)
    assert encoder.num_patches == 16 and encoder.hidden_size == 32


def test_open_clip_encoder_reads_block_outputs(experts):
    encoder = build_encoder({**experts["open_clip_encoder"], "feature_layer": -1, "keep_cls": True})
    visual = encoder.tower
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # reference: run the ViT by hand through all blocks (no final norm)
        tokens = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        tokens = torch.cat([cls, tokens], 1) + visual.positional_embedding
        tokens = visual.ln_pre(tokens)
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
        assert torch.allclose(encoder(x), tokens, atol=1e-5)
    assert encoder.num_patches == 17
