"""Shared by the speed benchmarks: a seechat model built from configs (no download) and the
transformers `LlavaForConditionalGeneration` holding the same weights, plus synthetic batches.

The reference is what a user would train instead: stock Llava (CLIP tower, LLaVA-1.5 projector,
the same causal LM) fed the same token ids, pixels and labels. `seechat.tools.export.export_llava_hf`
(`model_to_llava`, when present) is preferred for the conversion; otherwise the state dicts are copied here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from seechat.models.kinds import build_model
from seechat.models.base import SeeChatVLM
from seechat.experiments.tiny import train_tokenizer

CORPUS = ["What is in the image? A red circle next to a blue square."] * 20


def tower_config(image_size: int = 336, patch: int = 14, hidden: int = 512, layers: int = 6) -> dict:
    """A CLIP-like tower (LLaVA-1.5's ViT-L/14-336 geometry: 576 patches, narrower and shallower)."""
    return {"image_size": image_size, "patch_size": patch, "hidden_size": hidden,
            "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64), "projection_dim": hidden}


def lm_config(hidden: int = 512, layers: int = 8, vocab: int = 151_936) -> dict:
    """A Qwen2.5-like causal LM: Qwen2.5's vocabulary, a small width and depth."""
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 256),
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def seechat_model(
    adapter: dict, modes: dict[str, str], tower: dict | None = None, lm: dict | None = None,
    workdir: str | None = None, seed: int = 0,
) -> SeeChatVLM:
    """A seechat model with random weights fixed by `seed` (same seed -> same weights)."""
    workdir = workdir or tempfile.mkdtemp(prefix="seechat-bench-")
    tok_dir = Path(workdir) / "tokenizer"
    if not tok_dir.is_dir():
        train_tokenizer(CORPUS, vocab_size=300, template="chatml").save_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = {
        "encoder": {"backend": "hf", "pretrained": False, "arch": "clip", "config": tower or tower_config()},
        "adapter": adapter,
        "llm": {"tokenizer": str(tok_dir), "config": lm or lm_config()},
    }
    return build_model(cfg, modes)


def llava_from(model: SeeChatVLM) -> LlavaForConditionalGeneration:
    """Stock Llava with the seechat model's weights (MLP adapter, HF CLIP tower, no LoRA)."""
    try:
        from seechat.tools.export import model_to_llava  # the library's exporter, when present
    except ImportError:
        return _copy_into_llava(model)
    return model_to_llava(model)


def _copy_into_llava(model: SeeChatVLM) -> LlavaForConditionalGeneration:
    enc, adapter, lm = model.encoder, model.adapter, model.base_llm
    if getattr(adapter, "projector", None) != "mlp2x_gelu" or getattr(adapter, "pixel_shuffle", 1) != 1:
        raise ValueError("the Llava reference needs an mlp2x_gelu adapter without pixel shuffle")
    config = LlavaConfig(
        vision_config=enc.tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy="full" if enc.keep_cls else "default",
        projector_hidden_act="gelu",
    )
    llava = LlavaForConditionalGeneration(config)
    inner = llava.model
    inner.vision_tower.load_state_dict(enc.tower.state_dict())
    proj = {"linear_1.weight": adapter.proj[0].weight, "linear_1.bias": adapter.proj[0].bias,
            "linear_2.weight": adapter.proj[2].weight, "linear_2.bias": adapter.proj[2].bias}
    inner.multi_modal_projector.load_state_dict(proj)
    inner.language_model.load_state_dict(lm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    return llava


def synthetic_batch(
    model: SeeChatVLM, batch: int, text_tokens: int, supervised: int, seed: int = 0
) -> dict[str, Any]:
    """`batch` rows of [8 prompt ids, image placeholders, text ids]; the last `supervised` text
    tokens carry labels (the answer). Text ids avoid the tokenizer's special/added ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.base_llm.get_output_embeddings().weight.shape[0]
    low = len(model.tokenizer)
    n_img = model.num_image_tokens
    rows = []
    for _ in range(batch):
        head = torch.randint(low, vocab, (8,), generator=g)
        text = torch.randint(low, vocab, (text_tokens - 8,), generator=g)
        rows.append(torch.cat([head, torch.full((n_img,), model.image_token_id), text]))
    ids = torch.stack(rows)
    labels = ids.clone()
    labels[:, : ids.shape[1] - supervised] = -100
    size = model.encoder.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "num_images": torch.ones(batch, dtype=torch.long),
        "labels": labels,
    }


def bf16_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-`repeats` bf16 matmul throughput on this process's threads (the MFU denominator)."""
    import time

    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9
