"""Tiny experts built from configs: a byte-level BPE tokenizer with a chat template, tiny causal
LMs (Llama, Qwen2), tiny vision towers (HF CLIP, open_clip).

Nothing here downloads anything. The tests use these builders to make experts, save them with
`save_pretrained`, and load them back through the same `from_pretrained` path users take; the
easy-VQA demo uses them to make its experts from training data.
"""
from __future__ import annotations

from transformers import CLIPVisionConfig

# Moved to the tools room, where `seechat experts` builds them; re-exported for the tests and demo.
from seechat.tools.experts.tokenizer import tiny_llm_config, train_tokenizer

__all__ = ["tiny_clip_vision_config", "tiny_llm_config", "tiny_open_clip_overrides", "train_tokenizer"]


def tiny_clip_vision_config(
    image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, layers: int = 2, heads: int = 2
) -> CLIPVisionConfig:
    """Config of a tiny random-init CLIP vision tower."""
    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden_size,
    )


def tiny_open_clip_overrides(
    image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 2
) -> dict:
    """`config` overrides that turn any open_clip ViT into a tiny random-init one."""
    return {
        "embed_dim": width,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    }
