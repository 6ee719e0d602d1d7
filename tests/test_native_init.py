"""A native model grown from a pretrained text LM (`model.native.init_from`): every text id's
embedding and head row is bit-identical after the extension, the new rows carry the statistics of
the trained ones, and the recipe key resolves against the recipe file."""
from __future__ import annotations

import math

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from seechat.config import load_recipe
from seechat.errors import RecipeError
from seechat.experiments.tiny import tiny_llm_config
from seechat.models.kinds import load
from seechat.models.native.extend import statistical_rows
from seechat.models.native.model import assemble_native
from seechat.models.native.vq import VQTokenizer


@pytest.fixture(scope="module")
def untrained_vq(tmp_path_factory) -> Path:
    """A VQ tokenizer (16x16 -> 4x4 codes of 125); its weights do not matter here."""
    out = tmp_path_factory.mktemp("vq_init")
    torch.manual_seed(0)
    VQTokenizer(image_size=16, channels=8, downsample=2, levels=(5, 5, 5)).save_pretrained(out)
    return out


def text_lm(experts: dict, out: Path, tied: bool, padding: int = 0) -> Path:
    tok = AutoTokenizer.from_pretrained(experts["tokenizer"])
    config = tiny_llm_config("qwen2", len(tok) + padding, hidden_size=32)
    config.tie_word_embeddings = tied
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_extension_keeps_every_text_row_bit_identical(experts, untrained_vq, tmp_path, tied):
    lm_dir = text_lm(experts, tmp_path / "lm", tied, padding=7)  # 7 untrained padding rows, dropped
    before = AutoModelForCausalLM.from_pretrained(lm_dir)
    n_text = len(AutoTokenizer.from_pretrained(lm_dir))
    vq = VQTokenizer.from_pretrained(untrained_vq)
    model = assemble_native({"kind": "native", "native": {"vq": str(untrained_vq), "init_from": str(lm_dir),
                                                          "qk_norm": False}, "llm": {}}, vq)
    emb, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.vocab.vocab_size == len(model.tokenizer) + 125
    assert model.vocab.offset == len(model.tokenizer) > n_text  # seechat's <image>, <im_start>, <im_end> follow
    old_emb, old_head = before.get_input_embeddings().weight, before.get_output_embeddings().weight
    assert torch.equal(emb[:n_text], old_emb[:n_text])
    assert torch.equal(head[:n_text], old_head[:n_text])
    assert (head.data_ptr() == emb.data_ptr()) == tied
    # The new rows (seechat's tokens and the codes) have the trained rows' scale, not an
    # initialiser's: per-dimension mean and std within sampling error of the text rows'.
    for new, old in ((emb, old_emb), (head, old_head)):
        fresh, trained = new[n_text:].detach(), old[:n_text].detach()
        assert fresh.std(0).div(trained.std(0)).sub(1).abs().mean() < 0.15
        assert (fresh.mean(0) - trained.mean(0)).abs().max() < 4 * trained.std(0).max() / fresh.shape[0] ** 0.5
        assert fresh.std(0).min() > 0  # distinct rows: the codes are told apart from the first step
    # The same recipe builds the same model (the draw is seeded).
    again = assemble_native({"kind": "native", "native": {"vq": str(untrained_vq), "init_from": str(lm_dir),
                                                          "qk_norm": False}, "llm": {}}, vq)
    assert torch.equal(again.llm.get_input_embeddings().weight, emb)


def test_statistical_rows_follow_the_covariance():
    torch.manual_seed(0)
    mixing = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.0, 0.1]])
    rows = torch.randn(20000, 3) @ mixing.T + torch.tensor([1.0, -2.0, 0.5])
    drawn = statistical_rows(rows, 20000, torch.Generator().manual_seed(0))
    assert torch.allclose(drawn.mean(0), rows.mean(0), atol=0.05)
    assert torch.allclose(torch.cov(drawn.T), torch.cov(rows.T), atol=0.1)  # correlations kept, not just std
    few = statistical_rows(rows[:2], 5, torch.Generator().manual_seed(0))  # singular covariance: diagonal
    assert few.shape == (5, 3) and torch.isfinite(few).all()


def test_code_rows_can_share_the_codebook_geometry(experts, untrained_vq, tmp_path):
    """`model.native.code_init_share`: that share of each code row's variance lies along a linear
    map of the code's quantised vector; at 1 the code rows span exactly the codebook's dimensions."""
    lm_dir = text_lm(experts, tmp_path / "lm", tied=False)
    n_text = len(AutoTokenizer.from_pretrained(lm_dir))
    vq = VQTokenizer.from_pretrained(untrained_vq)

    def grown(share: float):
        return assemble_native({"kind": "native", "native": {"vq": str(untrained_vq), "init_from": str(lm_dir),
                                                             "qk_norm": False, "code_init_share": share},
                                "llm": {}}, vq)

    plain, shared = grown(0.0), grown(1.0)
    codes = shared.code_ids.nonzero().flatten()
    for a, b in ((plain.llm.get_input_embeddings(), shared.llm.get_input_embeddings()),
                 (plain.llm.get_output_embeddings(), shared.llm.get_output_embeddings())):
        assert torch.equal(a.weight[:n_text], b.weight[:n_text])
        rows = b.weight[codes].detach().double()
        assert torch.linalg.matrix_rank(rows - rows.mean(0), rtol=1e-6) == 3  # levels (5, 5, 5): 3 dimensions
        assert torch.linalg.matrix_rank(a.weight[codes].detach().double(), rtol=1e-6) == 32  # hidden size
    # Neighbouring codes (one level apart) start closer than codes far apart in the codebook.
    vectors = vq.quantizer.indices_to_codes(torch.arange(vq.codebook_size)).double()
    rows = shared.llm.get_input_embeddings().weight[codes].detach().double()
    near, far = torch.cdist(vectors, vectors) < 0.6, torch.cdist(vectors, vectors) > 1.5
    dist = torch.cdist(rows, rows)
    assert dist[near & (dist > 0)].mean() < dist[far].mean() / 2
    # Saved and loaded again, it is the same model (the saved LM holds the shaped rows).
    shared.save_pretrained(str(tmp_path / "saved"))
    again = load(str(tmp_path / "saved"))
    assert torch.equal(again.llm.get_input_embeddings().weight, shared.llm.get_input_embeddings().weight)
    assert torch.equal(again.llm.get_output_embeddings().weight, shared.llm.get_output_embeddings().weight)
    with pytest.raises(RecipeError, match=r"model\.native\.code_init_share=1\.5 must lie in \[0, 1\]"):
        grown(1.5)
    with pytest.raises(RecipeError, match=r"code_init_share=0\.5 shapes the code rows of a grown text LM"):
        assemble_native({"kind": "native", "native": {"vq": str(untrained_vq), "qk_norm": True, "code_init_share": 0.5},
                         "llm": {"tokenizer": experts["tokenizer"], "config": {
                             "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}}}, vq)


def test_init_from_resolves_against_the_recipe_file(experts, untrained_vq, tmp_path, monkeypatch):
    text_lm(experts, tmp_path / "experts" / "llm", tied=False)
    recipe = tmp_path / "recipes" / "native.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"stage": "finetune", "model": {
        "kind": "native", "native": {"vq": str(untrained_vq), "init_from": "../experts/llm", "qk_norm": False},
        "llm": {"tokenizer": experts["tokenizer"]}}}))
    monkeypatch.chdir(tmp_path / "experts")  # anywhere else
    cfg = load_recipe(recipe)
    assert cfg["model"]["native"]["init_from"] == str(tmp_path / "experts" / "llm")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model\.native\.init_from='\./nowhere'.*no such file"):
        load_recipe(recipe, ["model.native.init_from=./nowhere"])


BOTH = r"model\.native\.user_image_weight=.* must be >= 0 and model\.native\.cfg_dropout"


@pytest.mark.parametrize("key, value, match", [("user_image_weight", -1.0, BOTH), ("cfg_dropout", 1.5, BOTH),
                                               ("reply_image_weight", -0.5, r"model\.native\.reply_image_weight=-0\.5 must be >= 0")],
                         ids=["user_image_weight", "cfg_dropout", "reply_image_weight"])
def test_bad_native_weights_are_recipe_errors(experts, untrained_vq, tmp_path, key, value, match):
    lm_dir = text_lm(experts, tmp_path / "lm", tied=True)
    with pytest.raises(RecipeError, match=match):
        assemble_native({"kind": "native", "native": {"vq": str(untrained_vq), "init_from": str(lm_dir),
                                                      "qk_norm": False, key: value}, "llm": {}},
                        VQTokenizer.from_pretrained(untrained_vq))


def test_code_rows_can_start_at_the_words_they_stand_for(experts, untrained_vq, tmp_path):
    """`model.native.code_word_share`: a code row moves that share of the way to the weighted mean
    of its words' rows (`VQTokenizer.code_words`); codes with no words keep their drawn rows."""
    lm_dir = text_lm(experts, tmp_path / "lm", tied=False)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    vq = VQTokenizer.from_pretrained(untrained_vq)
    weights = torch.zeros(vq.codebook_size, 3)
    weights[0, 0] = 1.0                      # code 0: "red"
    weights[1] = torch.tensor([0.25, 0.25, 0.5])  # code 1: a mix
    vq.code_words = {"words": ["red", "blue", "circle"], "weights": weights.tolist()}
    vq.save_pretrained(tmp_path / "vq")
    vq = VQTokenizer.from_pretrained(tmp_path / "vq")  # code_words.json travels with the VQ
    assert vq.code_words["words"] == ["red", "blue", "circle"]

    def grown(share: float):
        return assemble_native({"kind": "native", "native": {"vq": str(tmp_path / "vq"), "init_from": str(lm_dir),
                                                             "qk_norm": False, "code_word_share": share},
                                "llm": {}}, vq)

    plain, half = grown(0.0), grown(0.5)
    codes = plain.code_ids.nonzero().flatten()
    for a, b in ((plain.llm.get_input_embeddings().weight, half.llm.get_input_embeddings().weight),
                 (plain.llm.get_output_embeddings().weight, half.llm.get_output_embeddings().weight)):
        word = torch.stack([a[tok(w, add_special_tokens=False)["input_ids"]].mean(0) for w in ("red", "blue", "circle")])
        assert torch.allclose(b[codes[0]], 0.5 * a[codes[0]] + 0.5 * word[0], atol=1e-6)
        assert torch.allclose(b[codes[1]], 0.5 * a[codes[1]] + 0.5 * (0.25 * word[0] + 0.25 * word[1] + 0.5 * word[2]),
                              atol=1e-6)
        assert torch.equal(b[codes[2:]], a[codes[2:]]) and torch.equal(b[: codes[0]], a[: codes[0]])
    with pytest.raises(RecipeError, match=r"code_word_share=2\.0 must lie in \[0, 1\]"):
        grown(2.0)
    vq.code_words = {"words": ["red"], "weights": [[1.0]] * 3}  # a stale file: not this VQ's codebook
    with pytest.raises(RecipeError, match=r"code_words\.json does not fit it \(\(3, 1\) weights for 125 codes"):
        grown(0.5)
    vq.code_words = None
    with pytest.raises(RecipeError, match=r"code_word_share=0\.5 needs the VQ's code_words\.json"):
        grown(0.5)


def test_code_word_weights_count_the_classes_each_code_occurs_with(untrained_vq):
    from seechat.models.native.vq import code_word_weights

    vq = VQTokenizer.from_pretrained(untrained_vq)
    torch.manual_seed(0)
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    color = torch.tensor([0, 1, 0, 1, 0, 1, -100, 0, 1, 0, 1, 0])
    shape = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, -100, -100, -100])
    out = code_word_weights(vq, images, [(("red", "blue"), color), (("a", "b", "c"), shape)], batch_size=5)
    assert out["words"] == ["red", "blue", "a", "b", "c"]
    weights, codes = torch.tensor(out["weights"]), vq.encode(images)
    for code in codes.unique().tolist():
        expected = []
        for target, n in ((color, 2), (shape, 3)):
            hits = torch.tensor([(codes[i] == code).sum().item() if target[i] >= 0 else 0 for i in range(12)]).float()
            per = torch.zeros(n).index_add_(0, target.clamp_min(0), hits)
            expected.append(per / per.sum() if per.sum() else per)
        # each attribute weighted by its information gain: log(classes) - entropy of the shares
        gain = [math.log(len(e)) + sum(p * math.log(p) for p in e.tolist() if p > 0) if e.sum() else 0.0
                for e in expected]
        share = ([g / sum(gain) for g in gain] if sum(gain) > 1e-6 else
                 [float(bool(e.sum())) / max(1, sum(bool(e.sum()) for e in expected)) for e in expected])
        assert torch.allclose(weights[code], torch.cat([e * w for e, w in zip(expected, share)]), atol=1e-4)
        assert abs(weights[code].sum().item() - 1) < 1e-3
    unseen = torch.ones(vq.codebook_size, dtype=torch.bool)
    unseen[codes.unique()] = False
    assert weights[unseen].abs().sum() == 0
