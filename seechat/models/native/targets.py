"""What the native LM learns from: which image tokens are targets, and condition dropout.

* Images in assistant turns (drawings) are targets: their `<im_start>`, codes and `<im_end>`,
  at `model.native.reply_image_weight` (1: as text tokens).
* Images in user turns (the questions' images) are not, unless `model.native.user_image_weight`
  > 0: then their codes are targets too, at that weight (Chameleon trains on every token). The
  loss is the weighted mean over all targets: sum(w_i * ce_i) / sum(w_i), reply tokens at 1.
* Classifier-free guidance needs an unconditional model as well. With `model.native.cfg_dropout`
  = p, training replaces the whole prompt of a drawing (every position of its sample before the
  reply's `<im_start>`) by the null id (the pad id, whose row nothing else reads) with
  probability p. Sampling builds its unconditional rows the same way (`null_prompt`), so the
  guided prompt and its unconditional twin have the same length and positions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from seechat.data.tokenization import IGNORE_INDEX
from seechat.models.loss import chunked_head_loss


def assistant_image_labels(ids: torch.Tensor, labels: torch.Tensor, boi: int, span: int) -> torch.Tensor:
    """`labels` with every image of an assistant turn supervised (boundaries and codes): an image
    belongs to an assistant turn exactly when the token after its `<im_end>` is supervised."""
    labels = labels.clone()
    for row, start in (ids == boi).nonzero().tolist():
        after = start + span
        if after < ids.shape[1] and labels[row, after] != IGNORE_INDEX:
            labels[row, start:after] = ids[row, start:after]
    return labels


def user_image_labels(ids: torch.Tensor, targets: torch.Tensor, boi: int, span: int) -> torch.Tensor:
    """Labels (-100 elsewhere) at the codes of every image that is not a target in `targets`
    (the images of user turns); their boundary tokens stay unsupervised."""
    out = torch.full_like(ids, IGNORE_INDEX)
    for row, start in (ids == boi).nonzero().tolist():
        if targets[row, start] == IGNORE_INDEX:
            out[row, start + 1 : start + span - 1] = ids[row, start + 1 : start + span - 1]
    return out


def _sample_start(row: int, at: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> int:
    """First position of the sample holding position `at` of `row` (packed rows restart positions)."""
    if position_ids is not None:
        return int((position_ids[row, : at + 1] == 0).nonzero().max())
    if attention_mask is not None:
        return int(attention_mask[row].nonzero().min())
    return 0


def drop_conditions(ids: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, boi: int, null: int, p: float,
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """`ids` with the prompt of each drawing (a sample whose reply starts with an image and
    whose prompt holds none) replaced by `null` ids with probability `p` (module docstring)."""
    ids = ids.clone()
    for row, at in (ids == boi).nonzero().tolist():
        if targets[row, at] == IGNORE_INDEX:
            continue  # an image of a user turn
        start = _sample_start(row, at, attention_mask, position_ids)
        prompt = slice(start, at)
        if (labels[row, prompt] != IGNORE_INDEX).any() or (ids[row, prompt] == boi).any():
            continue  # the reply has text before the image, or the prompt shows an image: not a drawing
        if float(torch.rand((), generator=generator)) < p:
            real = (attention_mask[row, prompt].bool() if attention_mask is not None
                    else torch.ones_like(ids[row, prompt], dtype=torch.bool))
            ids[row, prompt] = ids[row, prompt].masked_fill(real, null)
    return ids


def null_prompt(ids: torch.Tensor, attention_mask: torch.Tensor, null: int) -> torch.Tensor:
    """The unconditional twin of left-padded prompts ending in `<im_start>`: every real
    position before the last one becomes `null` (what `drop_conditions` trains on)."""
    out = ids.clone()
    body = attention_mask.bool().clone()
    body[:, -1] = False
    out[body] = null
    return out


def weighted_lm_loss(base: PreTrainedModel, targets: Sequence[tuple[torch.Tensor, float]], z_loss: float = 0.0,
                     **inputs) -> CausalLMOutputWithPast:
    """One decoder pass, then sum_j w_j * n_j * loss_j / sum_j w_j * n_j over the label sets
    `targets` [(labels, weight)]: the mean of every target's loss, each weighted by its set's w."""
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1]
    head = base.get_output_embeddings()
    total, norm = hidden.sum() * 0.0, 0.0
    for labels, weight in targets:
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        count = int(keep.sum())
        if count == 0 or weight == 0:
            continue
        total = total + weight * count * chunked_head_loss(hidden[keep], head, shifted[keep], z_loss=z_loss)
        norm += weight * count
    return CausalLMOutputWithPast(loss=total / max(norm, 1e-12))
