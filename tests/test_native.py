"""The native early-fusion path: VQ tokenizer round trip, code <-> id bijection, z-loss, a native
model through the shared training loop, save/load, evaluation and image generation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from torch import nn

from seechat import load
from seechat.cli import main
from seechat.config import load_recipe
from seechat.inference.evaluate import evaluate_file
from seechat.models.loss import chunked_head_loss
from seechat.models.native.vocab import CodeVocab
from seechat.models.native.vq import HALF, VQTokenizer, train_vq, vq_metrics
from seechat.models.encoders import HFVisionEncoder
from seechat.models.encoders.base import clip_style_transform
from seechat.training.loop import run

SIZE = 16
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


def shape_image(i: int) -> Image.Image:
    """A colored rectangle or circle at a position and size that vary with `i`."""
    image = Image.new("RGB", (SIZE, SIZE), (245, 240, 235))
    color = list(COLORS.values())[i % 3]
    x, y, s = 1 + (i * 7) % 7, 1 + (i * 5) % 7, 5 + (i * 3) % 4
    draw = ImageDraw.Draw(image)
    (draw.rectangle if (i // 3) % 2 else draw.ellipse)([x, y, x + s, y + s], fill=color)
    return image


def pixels(indices) -> torch.Tensor:
    transform = clip_style_transform(SIZE, HALF, HALF)
    return torch.stack([transform(shape_image(i)) for i in indices])


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    """A tiny VQ tokenizer (16x16 -> 4x4 codes of 125) trained for a few seconds."""
    out = tmp_path_factory.mktemp("vq")
    vq = train_vq(pixels(range(256)), epochs=8, batch_size=8, lr=3e-3, channels=32, downsample=2, levels=(5, 5, 5))
    vq.save_pretrained(out)
    return out


def test_vq_round_trip_beats_mean_image(vq_dir):
    vq = VQTokenizer.from_pretrained(vq_dir)
    heldout = pixels(range(1000, 1064))
    metrics = vq_metrics(vq, heldout)
    # The mean image (a blur of every shape) is the best constant guess; the codes must carry
    # the shapes: at least 3x lower error (measured 0.011 vs 0.051 on [0, 1] pixels).
    assert metrics["mse"] < metrics["mean_image_mse"] / 3, metrics
    assert metrics["psnr"] > metrics["mean_image_psnr"] + 4.7
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 125
    codes = vq.encode(heldout)
    assert codes.shape == (64, 16) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < vq.codebook_size == 125
    # decode(encode(x)) is stable: re-encoding the reconstruction gives mostly the same codes
    again = vq.encode(vq.decode(codes))
    assert (again == codes).float().mean() > 0.8
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 125\)"):
        vq.decode(torch.full((1, 16), 125))
    with pytest.raises(ValueError, match=r"expects \[B, 3, 16, 16\]"):
        vq.encode(torch.zeros(1, 3, 8, 8))


SHAPES = ("ellipse", "rectangle")


def _shape_of(indices) -> torch.Tensor:
    return torch.tensor([(i // 3) % 2 for i in indices])  # shape_image: ellipse 0, rectangle 1


def _tower() -> HFVisionEncoder:
    """A tiny SigLIP-shaped tower for 16-px images (random init: the semantic codes' linear map
    is what learns)."""
    return HFVisionEncoder(pretrained=False, arch="siglip", feature_layer=-1, config={
        "image_size": SIZE, "patch_size": 4, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 2})


def test_semantic_vq_puts_the_image_class_in_front_of_the_grid(vq_dir):
    train, heldout = range(256), range(1000, 1128)
    tower = _tower()
    vq = train_vq(pixels(train), epochs=8, batch_size=8, lr=3e-3, channels=32, downsample=2, levels=(5, 5, 5),
                  semantic_tokens=2, labels=[(SHAPES, _shape_of(train))], tower=tower)
    assert vq.num_codes == 2 + 16 and vq.grid_codebook_size == 125 and vq.codebook_size == 125 * 3
    # the tower is copied in and stays as it was
    assert all(torch.equal(a, b) for a, b in zip(vq.semantic.encoder.state_dict().values(), tower.state_dict().values()))
    codes = vq.encode(pixels(heldout))
    assert codes.shape == (128, 18)
    # each semantic token its own id range after the grid's
    assert (codes[:, 0] // 125 == 1).all() and (codes[:, 1] // 125 == 2).all() and (codes[:, 2:] < 125).all()
    # The two semantic codes tell the shape (each pair's majority shape on the training images;
    # measured 89.8% on the held-out images through this random tower, chance 50%)
    train_codes, votes = vq.encode(pixels(train)), {}
    for pair, shape in zip(map(tuple, train_codes[:, :2].tolist()), _shape_of(train).tolist()):
        votes.setdefault(pair, [0, 0])[shape] += 1
    guess = [max(range(2), key=votes.get(pair, [1, 0]).__getitem__) for pair in map(tuple, codes[:, :2].tolist())]
    assert (torch.tensor(guess) == _shape_of(heldout)).float().mean() >= 0.85
    # the grid is the plain VQ's (same seed, its own loss): the same codes; the decoder reads only it
    assert torch.equal(codes[:, 2:], VQTokenizer.from_pretrained(vq_dir).encode(pixels(heldout)))
    swapped = codes.clone()
    swapped[:, :2] = 125  # other semantic codes: the same pixels
    swapped[:, 5] += 125  # a semantic-range id in a grid slot reads as the grid code of that vector
    assert torch.equal(vq.decode(swapped), vq.decode(codes))
    with pytest.raises(ValueError, match=r"semantic_tokens=2 needs labels and a tower.*0 attributes, a tower"):
        train_vq(pixels(range(8)), epochs=1, semantic_tokens=2, tower=tower)
    with pytest.raises(ValueError, match=r"semantic_tokens=2 needs labels and a tower.*1 attributes, no tower"):
        train_vq(pixels(range(8)), epochs=1, semantic_tokens=2, labels=[(SHAPES, _shape_of(range(8)))])
    with pytest.raises(ValueError, match=r"semantic_tokens=-1 must be >= 0"):
        VQTokenizer(image_size=16, downsample=2, semantic_tokens=-1)
    with pytest.raises(ValueError, match=r"semantic_tokens=3 needs a semantic_encoder"):
        VQTokenizer(image_size=16, downsample=2, semantic_tokens=3)
    with pytest.raises(ValueError, match=r"semantic_tokens=1 must be at least the number of attributes \(2\)"):
        train_vq(pixels(range(8)), epochs=1, semantic_tokens=1, tower=tower,
                 labels=[(SHAPES, _shape_of(range(8))), (("a", "b"), _shape_of(range(8)))])


def test_semantic_vq_round_trip(tmp_path):
    """The tower travels inside the VQ (vq.json: its architecture, vq.safetensors: its weights)."""
    vq = train_vq(pixels(range(16)), epochs=1, batch_size=8, channels=8, downsample=2, levels=(5, 5, 5),
                  semantic_tokens=1, labels=[(SHAPES, _shape_of(range(16)))], tower=_tower())
    vq.save_pretrained(tmp_path)
    again = VQTokenizer.from_pretrained(tmp_path)
    assert again.config["semantic_tokens"] == 1 and again.config["semantic_encoder"]["arch"] == "siglip"
    assert torch.equal(again.encode(pixels(range(4))), vq.encode(pixels(range(4))))
    assert "semantic_tokens" not in VQTokenizer(image_size=16, downsample=2).config  # older configs load as before
    config = json.loads((tmp_path / "vq.json").read_text())
    del config["semantic_encoder"]  # as the removed CNN semantic encoder wrote it
    (tmp_path / "vq.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"made with the removed CNN semantic encoder; remake it"):
        VQTokenizer.from_pretrained(tmp_path)


def test_semantic_decoder_reads_the_semantic_codes(tmp_path):
    from seechat.models.native.vq import _mix_grid

    vq = train_vq(pixels(range(32)), epochs=2, batch_size=8, channels=8, downsample=2, levels=(5, 5, 5),
                  semantic_tokens=2, labels=[(SHAPES, _shape_of(range(32)))], tower=_tower(), semantic_decoder=True)
    assert vq.config["semantic_decoder"] is True and vq.dec[0].in_channels == 3 * (1 + 2)
    x = pixels(range(4))
    codes = vq.encode(x)
    with torch.no_grad():  # decode(codes) is the decoder on the encoder's own vectors
        grid, _ = vq.quantizer(vq.enc(x))
        semantic, _ = vq.semantic_latent(vq.semantic.features(x))
        assert torch.allclose(vq.decode(codes), vq.decode_latent(grid, semantic).clamp(-1, 1), atol=1e-6)
        assert torch.allclose(vq(x)[0].clamp(-1, 1), vq.decode(codes), atol=1e-5)  # forward reads them too
    other = codes.clone()
    other[:, :2] = torch.tensor([125 + 7, 250 + 99])  # other semantic codes: other pixels, same grid
    assert not torch.allclose(vq.decode(other), vq.decode(codes))
    vq.save_pretrained(tmp_path)
    assert torch.equal(VQTokenizer.from_pretrained(tmp_path).decode(codes), vq.decode(codes))
    # the training noise: no cell replaced at share 0; at share 1 the replaced cells are the
    # previous image's, the rest the image's own
    cells = torch.arange(4.0 * 3 * 4 * 4).reshape(4, 3, 4, 4)
    assert torch.equal(_mix_grid(cells, 0.0, torch.Generator().manual_seed(0)), cells)
    mixed = _mix_grid(cells, 1.0, torch.Generator().manual_seed(0))
    own, previous = mixed == cells, mixed == cells[[3, 0, 1, 2]]
    assert (own | previous).all() and previous.any() and own.any()
    assert (own.all(1) | previous.all(1)).all()  # a cell is replaced whole (all its channels)
    with pytest.raises(ValueError, match=r"semantic_decoder: true needs semantic_tokens > 0"):
        VQTokenizer(image_size=16, downsample=2, semantic_decoder=True)


def test_code_vocab_is_a_bijection():
    vocab = CodeVocab(offset=300, size=125)
    codes = torch.arange(125)
    ids = vocab.to_ids(codes)
    assert ids.tolist() == list(range(300, 425)) and vocab.vocab_size == 425
    assert torch.equal(vocab.to_codes(ids), codes)
    assert vocab.is_code(torch.tensor([299, 300, 424, 425])).tolist() == [False, True, True, False]
    assert int(vocab.code_mask().sum()) == 125 and not vocab.code_mask()[:300].any()
    for bad in (torch.tensor([125]), torch.tensor([-1])):
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 125\)"):
            vocab.to_ids(bad)
    for bad in (torch.tensor([299]), torch.tensor([425])):
        with pytest.raises(ValueError, match=r"image code ids must lie in \[300, 425\)"):
            vocab.to_codes(bad)
    with pytest.raises(TypeError):
        vocab.to_ids(torch.tensor([1.0]))


@pytest.mark.parametrize("wrapped", [False, True])
def test_z_loss_equals_closed_form(wrapped):
    torch.manual_seed(0)
    logits = (torch.randn(7, 11) * 3).requires_grad_()
    targets = torch.tensor([0, 3, 10, 5, 5, 1, 2])
    head = nn.Linear(11, 11, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(11))  # head(hidden) = hidden: the logits are the fixed tensor
    head = nn.Sequential(head) if wrapped else head  # not an nn.Linear: the checkpointed fallback
    loss = chunked_head_loss(logits, head, targets, chunk_size=3, z_loss=0.1)
    reference_input = logits.detach().clone().requires_grad_()
    lse = reference_input.logsumexp(-1)
    reference = F.cross_entropy(reference_input, targets) + 0.1 * lse.square().mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    reference.backward()
    assert torch.allclose(logits.grad, reference_input.grad, atol=1e-6)
    plain = chunked_head_loss(logits.detach(), head, targets, chunk_size=3)
    assert plain.item() == pytest.approx(F.cross_entropy(logits.detach(), targets).item(), rel=1e-5)


# ---------------------------------------------------------------------- the native model end to end
@pytest.fixture(scope="module")
def native_data(tmp_path_factory) -> dict:
    """VQA samples about the shapes' colors, text -> image samples, and a text-only sample."""
    root = tmp_path_factory.mktemp("native_data")
    (root / "images").mkdir()
    samples = []
    for i in range(24):
        shape_image(i).save(root / "images" / f"{i}.png")
        color = list(COLORS)[i % 3]
        samples.append({"id": f"q{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": color}]})
        samples.append({"id": f"draw{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"draw a {color} shape"}, {"from": "gpt", "value": "<image>"}]})
    samples.append({"id": "text", "conversations": [
        {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "red"}]})
    (root / "train.json").write_text(json.dumps(samples))
    (root / "test.json").write_text(json.dumps([s for s in samples if s["id"].startswith("q")][:12]))
    return {"root": str(root), "train": str(root / "train.json"), "test": str(root / "test.json")}


def native_recipe(experts: dict, vq_dir: Path, data: dict, out: Path, *overrides: str) -> dict:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({
        "stage": "finetune",
        "output_dir": str(out),
        "model": {
            "kind": "native",
            "native": {"vq": str(vq_dir), "z_loss": 1e-4},
            "llm": {"tokenizer": experts["tokenizer"], "attn_implementation": "eager", "config": {
                "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}},
        },
        "data": {"train": data["train"], "test": data["test"], "image_root": data["root"], "num_workers": 0},
        "train": {"batch_size": 8, "lr": 1e-2, "max_steps": 30, "log_every": 1, "trackers": [],
                  "mixed_precision": "no", "warmup_ratio": 0.0},
    }))
    return load_recipe(path, list(overrides))


@pytest.fixture(scope="module")
def trained(experts, vq_dir, native_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("native_run") / "run"
    summary = run(native_recipe(experts, vq_dir, native_data, out))
    return {"out": out, "summary": summary}


def test_native_trains_the_same_on_cached_codes(experts, vq_dir, native_data, tmp_path):
    """data.feature_cache stores the frozen VQ's codes: same losses as encoding every step."""
    from seechat.data.feature_cache import FeatureCache

    losses = {}
    for name, setting in (("plain", "off"), ("cached", str(tmp_path / "cache"))):
        run(native_recipe(experts, vq_dir, native_data, tmp_path / name, "train.max_steps=6",
                          f"data.feature_cache={setting}"))
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["plain"]) == 6 and losses["cached"] == losses["plain"]
    [key] = (tmp_path / "cache").iterdir()
    cache, vq = FeatureCache(tmp_path / "cache", key.name), VQTokenizer.from_pretrained(vq_dir)
    assert len(cache) == 24  # one row per training image, its 16 codes
    image = Path(native_data["root"]) / "images" / "5.png"
    stored = cache.get(cache.key_of(image))
    assert stored.dtype == torch.int32 and torch.equal(stored.long(), vq.encode(vq.transform(Image.open(image))[None])[0])


def test_native_trains_through_the_shared_loop(trained):
    curve = [json.loads(x)["loss"] for x in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5, curve
    meta = json.loads((trained["out"] / "final" / "seechat.json").read_text())
    assert meta["model"]["kind"] == "native" and meta["modes"]["llm"] == "full"
    assert trained["summary"]["trainable_parameters"] > 0
    model = load(trained["out"] / "final")
    assert [name for name, _ in model.named_children()] == list(model.parts) == ["vq", "llm"]


def test_native_load_evaluate_and_supervise_drawn_images(trained, native_data):
    model = load(trained["out"] / "final")
    assert type(model).__name__ == "NativeVLM" and not any(p.requires_grad for p in model.parameters())
    assert model.num_image_tokens == 16 and model.vocab.size == 125
    result = evaluate_file(model, native_data["test"], image_root=native_data["root"], batch_size=4, max_new_tokens=3)
    assert result["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    # answers are text: no image code or boundary id is ever generated
    from seechat.data import VLMCollator
    from seechat.inference.evaluate import PromptDataset

    records = json.loads(Path(native_data["test"]).read_text())[:4]
    batch = VLMCollator(model.tokenizer.pad_token_id, "left")([PromptDataset(records, model, native_data["root"])[i] for i in range(4)])
    out = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"],
                         max_new_tokens=4, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert bool(model.text_ids[out].all())
    # a drawn image is supervised (boundaries + codes + the end-of-turn token); a question's is not
    from seechat.data import SampleEncoder

    encoder = SampleEncoder(model.tokenizer, model.image_transform, model.num_image_tokens, image_root=native_data["root"])
    samples = json.loads(Path(native_data["train"]).read_text())
    for sample, expected in ((samples[1], 16 + 2 + 1), (samples[0], len(model.tokenizer("red<|im_end|>")["input_ids"]))):
        item = encoder(sample, 0)
        ids = model.spliced_ids(item["input_ids"][None], item["pixel_values"], torch.tensor([1]))
        labels = model.image_labels(ids, item["labels"][None])
        assert int((labels != -100).sum()) == expected, sample["id"]
        assert int(model.vocab.is_code(ids).sum()) == 16


def test_z_loss_enters_the_native_loss(trained, native_data):
    model = load(trained["out"] / "final")
    from seechat.data import SampleEncoder

    encoder = SampleEncoder(model.tokenizer, model.image_transform, model.num_image_tokens, image_root=native_data["root"])
    item = encoder(json.loads(Path(native_data["train"]).read_text())[0], 0)
    batch = dict(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"], num_images=torch.tensor([1]),
                 labels=item["labels"][None])
    model.z_loss = 0.0
    ce = model(**batch).loss
    model.z_loss = 0.5
    total = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], num_images=batch["num_images"]).logits
    keep = batch["labels"][0, 1:] != -100
    lse = logits[0, :-1][keep].float().logsumexp(-1)
    assert (total - ce).item() == pytest.approx(0.5 * lse.square().mean().item(), rel=1e-4)


def test_supervised_labels_count_the_image_codes_the_loss_averages_over(trained, native_data):
    # The training loop weights batches (processes, accumulated micro-batches) by this count.
    model = load(trained["out"] / "final")
    from seechat.data import SampleEncoder

    encoder = SampleEncoder(model.tokenizer, model.image_transform, model.num_image_tokens, image_root=native_data["root"])
    records = json.loads(Path(native_data["train"]).read_text())
    drawn = next(r for r in records if "<image>" in r["conversations"][-1]["value"])  # an image in the reply
    item = encoder(drawn, 0)
    ids, labels = item["input_ids"][None], item["labels"][None]
    spliced = model.spliced_ids(ids, item["pixel_values"], torch.tensor([1]))
    counted = model.supervised_labels(ids, labels) != -100
    assert torch.equal(counted, model.image_labels(spliced, labels) != -100)
    assert counted.sum() == (labels != -100).sum() + model.positions_per_image  # codes + boundaries


def test_generate_image_cli_writes_a_png(trained, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate-image", "--model", str(trained["out"] / "final"), "draw a red shape", "--out", str(out),
                 "--seed", "0"]) == 0
    with Image.open(out) as image:
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    guided = tmp_path / "g.png"
    assert main(["generate-image", "--model", str(trained["out"] / "final"), "draw a red shape", "--out", str(guided),
                 "--cfg", "3", "--top-k", "20", "--temperature", "0.8", "--n", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("g-*.png")) == ["g-0.png", "g-1.png"]


def test_stabiliser_switches(experts, vq_dir, native_data, tmp_path):
    from seechat.training.loop import model_for

    recipe = native_recipe(experts, vq_dir, native_data, tmp_path / "r", "model.native.qk_norm=false",
                           "model.native.hidden_dropout=0.5")
    model = model_for(recipe)
    attn = model.llm.get_decoder().layers[0].self_attn
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout active
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="encoder.mode='full'"):
        model_for(native_recipe(experts, vq_dir, native_data, tmp_path / "r2", "encoder.mode=full"))


def test_a_pretrained_text_lm_with_padded_vocabulary_gets_codes_after_its_tokenizer(experts, vq_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seechat.models.native.model import assemble_native
    from seechat.models.native.vq import VQTokenizer
    from seechat.experiments.tiny import tiny_llm_config

    vq = VQTokenizer.from_pretrained(vq_dir)
    tok = AutoTokenizer.from_pretrained(experts["tokenizer"])
    # A checkpoint padding its vocabulary past the tokenizer by more than the codebook (as
    # Qwen2.5 does by 271 rows): there is no room to confuse with codes, and no error either.
    padded = len(tok) + vq.codebook_size + 50
    AutoModelForCausalLM.from_config(tiny_llm_config("qwen2", padded, hidden_size=32)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    model = assemble_native({"kind": "native", "native": {"vq": str(vq_dir), "qk_norm": False},
                             "llm": {"name_or_path": str(tmp_path / "lm"), "tokenizer": str(tmp_path / "lm")}}, vq)
    rows = model.llm.get_input_embeddings().weight
    assert rows.shape[0] == model.vocab.vocab_size == len(model.tokenizer) + vq.codebook_size
    assert model.vocab.offset == len(model.tokenizer)
