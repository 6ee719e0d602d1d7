"""A byte-level BPE tokenizer trained on a corpus, with a chat template, and the config of a
small causal LM sized to it: the text half of experts made offline (nothing is downloaded).
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

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
