"""A small Qwen2-architecture chat LM trained on the data's own text, each image replaced by its
caption words ("3\\nis this an even digit?" -> "no"): it learns the task's language and reasoning
over text, as a real LLM brings them, so that stitching only has to map images to what those
caption words mean to it (the align stage).
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from seechat.precision import cpu_autocast
from seechat.tools.experts.tokenizer import tiny_llm_config

logger = logging.getLogger(__name__)


def _encode(examples: Sequence[tuple[str, str]], tokenizer) -> tuple[list[torch.Tensor], list[int]]:
    """Ids of each (user content, answer) chat exchange and the length of its prompt part."""
    encoded, prompt_lengths = [], []
    for content, answer in examples:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                               tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = tokenizer(f"{answer}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
        encoded.append(torch.tensor(p_ids + reply))
        prompt_lengths.append(len(p_ids))
    return encoded, prompt_lengths


def llm_config(vocab_size: int, hidden_size: int = 192, layers: int = 4, heads: int = 3, init_std: float = 0.1):
    """A Qwen2 config of the given sizes."""
    config = tiny_llm_config("qwen2", vocab_size, hidden_size=hidden_size, layers=layers, heads=heads)
    # HF's default init (std 0.02) suits widths in the thousands. At width 192 it leaves the
    # attention logits near zero, and the LM never learns to compare the question's word with
    # the caption's (easy-VQA: yes/no at chance after 4 epochs); std 0.1 (about 1.4/sqrt(width))
    # learns it in one epoch.
    config.initializer_range = init_std
    return config


def build_llm(examples: Sequence[tuple[str, str]], tokenizer, out: Path, epochs: int = 1, batch_size: int = 64,
              hidden_size: int = 192, layers: int = 4, heads: int = 3, init_std: float = 0.1, lr: float = 2e-3,
              seed: int = 0, dtype: torch.dtype | None = None, progress: bool = False, config=None):
    """Train and save (model and tokenizer) the LM on `examples`: (user content, answer) pairs,
    the loss on the answer and its end token only, as in chat finetuning. `config`: the LM's
    config, instead of `llm_config` of the given sizes."""
    torch.manual_seed(seed)
    config = config if config is not None else llm_config(len(tokenizer), hidden_size, layers, heads, init_std)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")  # eager: faster on CPU here
    encoded, prompt_lengths = _encode(examples, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    start = time.time()
    bar = tqdm(total=steps, desc="llm", disable=not progress)
    for epoch in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            rows = [encoded[j] for j in batch]
            ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
            positions = torch.arange(ids.shape[1])[None]
            mask = (positions < torch.tensor([len(r) for r in rows])[:, None]).long()
            answer = positions >= torch.tensor([prompt_lengths[j] for j in batch])[:, None]
            labels = ids.masked_fill((mask == 0) | ~answer, -100)
            with cpu_autocast(dtype):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        logger.info("llm epoch %d: loss %.4f", epoch + 1, loss.item())
    bar.close()
    logger.info("llm pretraining: %.0fs", time.time() - start)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model
