"""The causal LM and its tokenizer: loading, seechat's special tokens, and 4-bit loading for QLoRA.

The LM is any `AutoModelForCausalLM` (name or local path). seechat adds `<image>` (and, if the
recipe asks, image boundary tokens) as special tokens and resizes the embeddings. New rows are
set to the mean of the existing ones - deterministic, so a frozen or LoRA-tuned LM can be
rebuilt from its reference alone when a saved model is loaded.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from seechat.data.tokenization import IMAGE_START, IMAGE_END
from seechat.models.pretrained import from_pretrained
from seechat.data.chat_templates import CHAT_TEMPLATES, TEMPLATE_TOKENS

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def load_tokenizer(cfg: dict[str, Any]) -> PreTrainedTokenizerBase:
    """Tokenizer from `llm.tokenizer` (default: `llm.name_or_path`) with seechat's tokens added."""
    source = cfg.get("tokenizer") or cfg.get("name_or_path")
    if not source:
        raise ValueError("llm.tokenizer or llm.name_or_path must name a tokenizer (Hub id or path)")
    key = "model.llm.tokenizer" if cfg.get("tokenizer") else "model.llm.name_or_path"
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, key, cfg.get("trust_remote_code", False))
    if cfg.get("chat_template"):
        # A name of a built-in template (chat_templates.py, docs/families.md) or a Jinja string.
        name = cfg["chat_template"]
        tokenizer.chat_template = CHAT_TEMPLATES.get(name, name)
        # The named template's control tokens, as single special tokens (the end token must be one
        # token to be learnt and stopped at); the LM's embeddings grow to fit in `load_llm`.
        missing = [t for t in TEMPLATE_TOKENS.get(name, ()) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {source!r} has no chat template; seechat renders conversations with the "
            f"tokenizer's own template. Set llm.chat_template to one of {sorted(CHAT_TEMPLATES)} "
            "or to a Jinja template string."
        )
    new = [IMAGE_TOKEN] + ([IMAGE_START, IMAGE_END] if cfg.get("image_boundary_tokens") else [])
    new = [t for t in new if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        logger.info("tokenizer %s has no pad token; added %s", source, PAD_TOKEN)
    return tokenizer


def load_llm(
    cfg: dict[str, Any], tokenizer: PreTrainedTokenizerBase, quantize_4bit: bool = False
) -> PreTrainedModel:
    """The causal LM from `llm.name_or_path` (or random-init from `llm.config` when no path is
    given), resized to the tokenizer. `quantize_4bit` loads NF4 with double quantisation and
    bf16 compute (QLoRA)."""
    dtype = getattr(torch, cfg["dtype"]) if cfg.get("dtype") else None
    if cfg.get("name_or_path"):
        kwargs: dict[str, Any] = {"dtype": dtype}
        if quantize_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs["device_map"] = cfg.get("device_map") or _default_device()
        if cfg.get("attn_implementation"):
            kwargs["attn_implementation"] = cfg["attn_implementation"]
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, cfg["name_or_path"], "model.llm.name_or_path",
                                cfg.get("trust_remote_code", False), **kwargs)
        if quantize_4bit:
            keep_4bit_trainable(model)
    elif cfg.get("config"):
        if quantize_4bit:
            raise ValueError("llm.mode=qlora needs llm.name_or_path (4-bit loading quantises saved weights)")
        config = dict(cfg["config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    else:
        raise ValueError("llm needs name_or_path (Hub id or local path) or config (random init)")
    resize_to_tokenizer(model, tokenizer)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def keep_4bit_trainable(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for inference the
    first time it runs in eval mode without grad (a validation pass, a generation, a probe), and
    from then on no gradient flows through that layer: QLoRA would silently stop training the
    LoRA of every repacked layer. A model loaded for QLoRA keeps the trainable packing."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def resize_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the vocabulary to fit the tokenizer; new rows = mean of the old ones (deterministic)."""
    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new <= old:
        return
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:  # (tied embeddings get the same mean twice: harmless)
                emb.weight[old:] = emb.weight[:old].float().mean(0, keepdim=True).to(emb.weight.dtype)


def hidden_size(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[1]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
