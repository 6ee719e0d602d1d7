"""Architectures of well-known Hub checkpoints, so that `seechat estimate` can size them on a
machine that cannot reach the Hub (the configs' published shapes; no weights)."""
from __future__ import annotations

from typing import Any

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "lmsys/vicuna-7b-v1.5": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                             "vocab_size": 32000},
    "lmsys/vicuna-13b-v1.5": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
                              "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                              "vocab_size": 32000},
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                 "vocab_size": 32000},
    "Qwen/Qwen2.5-0.5B-Instruct": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                                   "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B-Instruct": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "vocab_size": 152064, "tie_word_embeddings": False},
    "openai/clip-vit-large-patch14-336": {"model_type": "clip_vision_model", "hidden_size": 1024,
                                          "intermediate_size": 4096, "num_hidden_layers": 24,
                                          "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
    "openai/clip-vit-large-patch14": {"model_type": "clip_vision_model", "hidden_size": 1024,
                                      "intermediate_size": 4096, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
}
