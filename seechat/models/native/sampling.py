"""Native decoding: text and images in one reply, drawing with classifier-free guidance.

Each row is in text mode or image mode, and the boundary tokens switch it:

* text mode: text ids, `<im_start>` or the end token may come next;
* `<im_start>` switches to image mode: exactly `n` code ids (the VQ's codes per image) follow,
  then `<im_end>` is forced and the row is back in text mode.

Drawing only (`draw_only`: the prompt ends with `<im_start>`) stops at that `<im_end>`.

Guidance (Ho & Salimans 2022; Janus and Lumina-mGPT draw this way): every row has an
unconditional twin whose prompt is the null id at every position (`targets.drop_conditions`
trained the model on such prompts) and which is fed the same tokens. In image mode the logits are
`c + (s - 1) * (c - u)` for the conditional `c`, unconditional `u` and scale `s`; written so
that scale 1 is exactly conditional sampling, which then skips the twins. Image codes are always
sampled (greedy decoding collapses to flat images) with `temperature` and `top_k`; text is greedy
unless `do_sample`.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from seechat.models.base import _pick
from seechat.models.native.targets import null_prompt
from seechat.precision import reuse_autocast_casts


@torch.no_grad()
def decode_native(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                  draw_only: bool = False, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                  do_sample: bool = False, generator: torch.Generator | None = None,
                  pixel_values: torch.Tensor | None = None, num_images: torch.Tensor | None = None) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] for left-padded prompts, pad after each row's end
    (the end token; with `draw_only`, the image's `<im_end>`). `model` is a `NativeVLM`."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("decode_native needs left-padded prompts")
    if cfg_scale <= 0:
        raise ValueError(f"cfg_scale={cfg_scale}: the guidance scale must be > 0 (1: no guidance)")
    b, n = input_ids.shape[0], model.vq.num_codes
    guided = cfg_scale != 1.0
    with reuse_autocast_casts(model):
        embeds = model.embed(input_ids, pixel_values, num_images)
        mask = attention_mask.long()
        if guided:
            twins = null_prompt(input_ids, attention_mask, model.null_id) if draw_only else \
                input_ids.masked_fill(attention_mask.bool(), model.null_id)
            embeds = torch.cat([embeds, model.embed(twins)])
            mask = torch.cat([mask, mask])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_embeds, step_positions = embeds, positions
        cache, embed_tokens = DynamicCache(), model.llm.get_input_embeddings()
        device = input_ids.device
        in_image = torch.full((b,), draw_only, dtype=torch.bool, device=device)
        codes_done = torch.zeros(b, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        text_ok = model.text_ids.clone()
        if not draw_only:
            text_ok[model.boi_id] = True
        only_eoi = torch.zeros_like(text_ok)
        only_eoi[model.eoi_id] = True
        eos, pad, tokens = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id, []
        for _ in range(max_new_tokens):
            out = model.llm(inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            if guided:
                cond, uncond = logits[:b], logits[b:]
                logits = torch.where(in_image[:, None], cond + (cfg_scale - 1.0) * (cond - uncond), cond)
            logits[:, model.image_token_id] = float("-inf")  # never emit a placeholder
            allowed = torch.where(in_image[:, None], torch.where((codes_done < n)[:, None], model.code_ids, only_eoi),
                                  text_ok)
            logits = logits.masked_fill(~allowed, float("-inf"))
            token = torch.full((b,), pad, dtype=torch.long, device=device)
            if bool(in_image.any()):
                drawn = _pick(logits, True, temperature, top_k, 1.0, generator)
                token = torch.where(in_image, drawn, token)
            if not bool(in_image.all()):
                token = torch.where(in_image, token, _pick(logits, do_sample, temperature, top_k, 1.0, generator))
            token = torch.where(finished, torch.full_like(token, pad), token)
            tokens.append(token)
            ended = in_image & (token == model.eoi_id)
            codes_done = torch.where(in_image, codes_done + 1, torch.zeros_like(codes_done))
            finished |= (ended if draw_only else ~in_image & (token == eos))
            in_image = (in_image & ~ended) | (~in_image & (token == model.boi_id))
            if bool(finished.all()):
                break
            step = token.repeat(2) if guided else token
            step_embeds, step_positions = embed_tokens(step).unsqueeze(1), positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = torch.cat([positions, step_positions], dim=1)
        return torch.stack(tokens, dim=1)


def split_reply(model: Any, tokens: list[int]) -> list[str | list[int]]:
    """A mixed reply's tokens as parts: text (decoded) and images (their `n` codes), in order;
    the boundary tokens and the end token are not part of either."""
    parts: list[str | list[int]] = []
    text: list[int] = []
    i, n = 0, model.vq.num_codes
    while i < len(tokens):
        if tokens[i] == model.boi_id:
            if text:
                parts.append(model.tokenizer.decode(text, skip_special_tokens=True))
                text = []
            codes = tokens[i + 1 : i + 1 + n]
            if len(codes) == n:  # an image cut by max_new_tokens is dropped
                parts.append([int(c) - model.vocab.offset for c in codes])
            i += n + 2
            continue
        if tokens[i] in (model.tokenizer.eos_token_id, model.tokenizer.pad_token_id):
            break
        text.append(tokens[i])
        i += 1
    if text:
        parts.append(model.tokenizer.decode(text, skip_special_tokens=True))
    return parts
