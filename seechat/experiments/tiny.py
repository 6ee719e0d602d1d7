"""Tiny experts built from configs: a byte-level BPE tokenizer with a chat template, tiny causal
LMs (Llama, Qwen2), tiny vision towers (HF CLIP, open_clip).

Nothing here downloads anything. The tests use these builders to make experts, save them with
`save_pretrained`, and load them back through the same `from_pretrained` path users take; the
easy-VQA demo uses them to make its experts from training data.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from seechat.data.chat_templates import CHATML_TEMPLATE, LLAMA2_TEMPLATE



def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    template: str = "chatml",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a HF fast tokenizer with a chat
    template. `template` is "chatml" (Qwen2-like) or "llama2"."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if template == "chatml":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=CHATML_TEMPLATE,
        )
    if template == "llama2":
        # No pad token on purpose: like Llama-2, the loader has to add one.
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=LLAMA2_TEMPLATE
        )
    raise ValueError(f"unknown template {template!r}; valid: 'chatml', 'llama2'")


def tiny_llm_config(
    arch: str, vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4
) -> LlamaConfig | Qwen2Config:
    """Config of a tiny random-init causal LM of architecture `arch` ("llama" or "qwen2")."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown arch {arch!r}; valid: 'llama', 'qwen2'")


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
