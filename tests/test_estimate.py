"""Memory estimator arithmetic: parameter bytes, gradients and AdamW state match the real model."""
from __future__ import annotations

import pytest
import yaml

from seechat.models.kinds import build_model
from seechat.cli import main
from seechat.config import REPO_ROOT, load_recipe
from seechat.tools.estimate import NF4_BYTES, estimate
from seechat.models.kinds import stage_modes
from seechat.experiments.tiny import train_tokenizer

TOWER = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2}
LM = {"model_type": "llama", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    train_tokenizer(["a red circle"] * 5, vocab_size=300, template="chatml").save_pretrained(root / "tok")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"encoder": {"backend": "hf", "pretrained": False, "arch": "clip", "config": TOWER},
                  "adapter": "mlp2x_gelu", "llm": {"tokenizer": str(root / "tok"), "config": LM}},
        "train": {"batch_size": 2},
    }))
    return path


@pytest.mark.parametrize("stage,llm_mode", [("align", None), ("finetune", None), ("finetune", "lora")])
def test_weights_grads_and_adamw_state_match_the_built_model(recipe_path, stage, llm_mode):
    overrides = [f"stage={stage}"] + ([f"llm.mode={llm_mode}", "llm.lora={r: 4}"] if llm_mode else [])
    recipe = load_recipe(recipe_path, overrides)
    model = build_model(recipe["model"], stage_modes(stage, recipe["model"]))
    result = estimate(recipe, dtype="fp32")
    for name, est in result["modules"].items():
        params = list(getattr(model, name).parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        assert est.weights == total * 4, name  # fp32: 4 bytes per parameter, LoRA weights included
        assert est.trainable == trainable, name
        assert est.gradients == trainable * 4, name
        assert est.optimizer == 2 * trainable * 4, name  # AdamW: exp_avg + exp_avg_sq
    assert result["modules"]["encoder"].gradients == 0  # frozen in both stages


def test_bf16_halves_weight_bytes_and_qlora_quantises_linears(recipe_path):
    recipe = load_recipe(recipe_path, ["stage=finetune"])
    fp32, bf16 = estimate(recipe, dtype="fp32"), estimate(recipe, dtype="bf16")
    assert bf16["modules"]["llm"].weights * 2 == fp32["modules"]["llm"].weights
    assert bf16["modules"]["adapter"].weights == fp32["modules"]["adapter"].weights  # adapters train in fp32
    q = estimate(load_recipe(recipe_path, ["stage=finetune", "llm.mode=qlora", "llm.lora={r: 4}"]))
    h, i, kv, layers, vocab = 64, 128, 32, 2, 400
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    other = 2 * vocab * h + layers * 2 * h + h  # embeddings, head, norms: fp32
    lora = layers * 4 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    assert q["modules"]["llm"].weights == pytest.approx(linear * NF4_BYTES + other * 4 + lora * 4)


def test_activations_grow_with_batch_and_checkpointing_cuts_them(recipe_path):
    recipe = load_recipe(recipe_path, ["stage=finetune"])
    a1 = estimate(recipe, batch=1)["modules"]["llm"].activations
    a4 = estimate(recipe, batch=4)["modules"]["llm"].activations
    assert a4 > 3 * a1
    ckpt = estimate(load_recipe(recipe_path, ["stage=finetune", "llm.gradient_checkpointing=true"]), batch=4)
    # 2 layers: all but one layer's activations and the autocast weight copies are dropped
    assert ckpt["modules"]["llm"].activations < 0.75 * a4


def test_cli_on_the_7b_qlora_recipe_uses_the_built_in_table(capsys):
    assert main(["estimate", "--config", str(REPO_ROOT / "recipes" / "qlora_24gb.yaml"), "--dtype", "bf16",
                 "--gpu-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out  # Vicuna-7B's parameter count, lm_head included
    assert "built-in table (lmsys/vicuna-7b-v1.5" in out
    assert "fits in 24 GiB" in out


def test_unknown_model_is_named(recipe_path):
    # (a Hub-shaped name: a missing local path is already a RecipeError when the recipe loads)
    recipe = load_recipe(recipe_path, ["llm.config=null", "llm.name_or_path=no-such-org/no-such-model"])
    with pytest.raises(ValueError, match="no config for llm 'no-such-org/no-such-model'"):
        estimate(recipe)


def test_head_chunk_transient_counts_the_logit_buffers_alive_together(recipe_path):
    # align (LLM frozen, bf16 compute, fp32 weights): bf16 logits + their fp32 copy + the fp32
    # log-softmax (rows x vocab each), the bf16 head-weight copy and the gathered hidden rows
    # with their gradient (fp32)
    recipe = load_recipe(recipe_path, ["stage=align", "train.mixed_precision=bf16"])
    b, sup, vocab, h = 2, 5, 400, 64
    llm = estimate(recipe, batch=b, seq_len=40, supervised=sup)["modules"]["llm"]
    assert llm.transient == b * sup * vocab * (2 * 4 + 2) + vocab * h * 2 + b * sup * h * 8
    # full mode adds the fp32 head-gradient accumulator
    full = estimate(load_recipe(recipe_path, ["stage=finetune", "train.mixed_precision=bf16"]),
                    batch=b, seq_len=40, supervised=sup)["modules"]["llm"]
    assert full.transient == llm.transient + vocab * h * 4


def test_gradients_are_not_in_the_forward_peak_unless_accumulating(recipe_path):
    recipe = load_recipe(recipe_path, ["stage=finetune"])
    one = estimate(recipe, batch=2)
    m = one["modules"]
    grads = sum(x.gradients for x in m.values())
    acts = sum(x.activations for x in m.values())
    assert one["forward_peak"] == acts + max(x.transient for x in m.values())
    assert one["total"] == one["persistent"] + max(one["forward_peak"], grads)
    accum = estimate(load_recipe(recipe_path, ["stage=finetune", "train.grad_accum=4"]), batch=2)
    assert accum["forward_peak"] == one["forward_peak"] + grads


def test_cpu_adds_glibc_heap_retention_of_one_steps_activations_gpu_does_not(recipe_path):
    recipe = load_recipe(recipe_path, ["stage=finetune"])
    gpu, cpu = estimate(recipe, batch=2), estimate(recipe, batch=2, device="cpu")
    assert gpu["cpu_heap"] == 0
    acts = sum(x.activations for x in cpu["modules"].values())
    assert cpu["cpu_heap"] == acts > 0
    assert cpu["total"] == cpu["persistent"] + max(cpu["forward_peak"], cpu["backward_end"]) + acts
    # activation tensors of 32 MiB and more are mmapped by glibc and returned on free: no heap left
    big = estimate(recipe, batch=2, seq_len=140000, device="cpu")  # 2 x 140000 tokens x 64 x 2 B > 32 MiB
    assert big["cpu_heap"] == 0
