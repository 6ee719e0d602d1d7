"""Packing: several samples per row, with attention and positions kept per sample."""
from __future__ import annotations

import json

import pytest
import torch

from seechat.models.kinds import build_model
from seechat.data import VLMCollator, VLMDataset, read_llava_records
from seechat.data.packing import PackingCollator, pack_rows, padding_waste
from seechat.training.loop import run

from conftest import model_config, tiny_recipe

MODES = {"encoder": "frozen", "adapter": "full", "llm": "full"}


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    assert pack_rows([6, 6], 6) == [[0], [1]]
    with pytest.raises(ValueError, match="length 7 does not fit a row of 6"):
        pack_rows([7, 1], 6)


def test_padding_waste_counts_pad_slots():
    lengths = [10, 4, 6, 2]
    # padded: 4 rows x 10 slots for 22 tokens; packed into rows of 10: [10], [4, 6], [2] -> 30 slots
    assert padding_waste(lengths, [[0, 1, 2, 3]]) == pytest.approx(1 - 22 / 40)
    assert padding_waste(lengths, [[0, 1, 2, 3]], packed=True) == pytest.approx(1 - 22 / 30)


def _items(experts, tiny_vqa, arch):
    torch.manual_seed(0)
    model = build_model(model_config(experts, llm=arch), MODES).eval()
    records = read_llava_records(tiny_vqa["train"])
    ds = VLMDataset(records, model.tokenizer, model.image_transform, model.num_image_tokens,
                    image_root=tiny_vqa["root"])
    by_id = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    return model, [by_id[k] for k in ("q0", "two-images", "text-only", "q1", "q2")]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_logits_equal_per_sample_logits(experts, tiny_vqa, arch):
    model, items = _items(experts, tiny_vqa, arch)
    batch = PackingCollator(model.tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape[0] < len(items)  # something was packed
    assert batch["attention_mask"] is None
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       num_images=batch["num_images"], position_ids=batch["position_ids"]).logits
        by_id = {item["id"]: item for item in items}
        for r, row_ids in enumerate(batch["rows"]):
            start = 0
            for sample_id in row_ids:
                item = by_id[sample_id]
                n = len(item["input_ids"])
                assert torch.equal(batch["position_ids"][r, start : start + n], torch.arange(n))
                alone = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                              num_images=torch.tensor([item["num_images"]])).logits[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, rtol=1e-5, atol=1e-5)
                start += n
        assert start <= max(lengths)


def test_packed_loss_equals_padded_loss_and_grads(experts, tiny_vqa):
    model, items = _items(experts, tiny_vqa, "qwen2")
    padded = VLMCollator(model.tokenizer.pad_token_id)(items)
    packed = PackingCollator(model.tokenizer.pad_token_id)(items)
    assert len(packed["rows"]) < len(items)  # tiny_vqa's samples do share rows
    keys = ("input_ids", "attention_mask", "pixel_values", "num_images", "labels")
    loss_a = model(**{k: padded[k] for k in keys}).loss
    loss_b = model(**{k: packed[k] for k in keys}, position_ids=packed["position_ids"]).loss
    # the same supervised tokens: packing only drops padding
    assert int((packed["labels"][:, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    params = [p for p in model.adapter.parameters()]
    grads_a = torch.autograd.grad(loss_a, params)
    grads_b = torch.autograd.grad(loss_b, params)
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cross_sample_attention_would_change_logits(experts, tiny_vqa):
    """The check above can fail: the same packed row with one plain causal mask differs."""
    model, items = _items(experts, tiny_vqa, "llama")
    batch = PackingCollator(model.tokenizer.pad_token_id)(items[:2] + items[3:4])
    row = next(r for r, ids in enumerate(batch["rows"]) if len(ids) > 1)
    n_img = int(batch["num_images"][:row].sum()), int(batch["num_images"][: row + 1].sum())
    args = dict(input_ids=batch["input_ids"][row : row + 1], num_images=batch["num_images"][row : row + 1],
                pixel_values=batch["pixel_values"][n_img[0] : n_img[1]])
    with torch.no_grad():
        isolated = model(**args, position_ids=batch["position_ids"][row : row + 1]).logits
        mixed = model(**args).logits  # positions 0..T-1, one causal mask over the whole row
    assert not torch.allclose(isolated, mixed, atol=1e-3)


def test_training_with_packing_runs_and_learns(experts, tiny_vqa, tmp_path):
    recipe = tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "data.packing=true", "train.max_steps=8")
    summary = run(recipe)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["steps"] == 8
    assert losses[-1] < losses[0]
    # Throughput counts samples, not packed rows: the same 8 steps unpacked read as many.
    unpacked = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "unpacked"), "train.max_steps=8"))
    assert summary["samples"] == unpacked["samples"] > 8  # rows hold several (see above)


def test_a_model_that_attends_across_packed_samples_is_refused(experts, tiny_vqa, monkeypatch):
    from seechat.data.packing import check_packed_attention

    model, _ = _items(experts, tiny_vqa, "llama")
    check_packed_attention(model.base_llm)  # stock transformers: block-diagonal mask, accepted
    check_packed_attention(model.base_llm, torch.autocast("cpu", dtype=torch.bfloat16))  # also in bf16
    # A model class that ignores the restarting position ids (as a remote-code model might):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM attends across packed samples: changing the first.*data.packing=false"):
        check_packed_attention(model.base_llm)
