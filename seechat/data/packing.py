"""Packing: several samples per row, attention kept within each sample (`data.packing: true`).

A padded batch spends compute on pad tokens up to its longest sample. `PackingCollator` takes
the same items a `VLMCollator` would batch and places them, first-fit by decreasing length,
into as few rows as fit in `capacity` tokens (default: the longest item of the batch, so a row
is never longer than the unpacked batch's). Each row carries `position_ids` that restart at 0
for every sample and no `attention_mask`: transformers (5.x, `masking_utils`) then detects the
packed layout from the position ids and builds a block-diagonal causal mask for eager and sdpa
attention, so no token sees another sample. The first label of every sample is set to -100:
it would otherwise be predicted from the previous sample's last token (unpacked, the first
token is never a target). The batch still holds the same samples and supervised tokens, so the
mean loss equals the unpacked one.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from seechat.data.collate import VLMCollator, image_field
from seechat.data.tokenization import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= `capacity` (first-fit
    decreasing); each row lists its items in their original order."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of length {max(lengths)} does not fit a row of {capacity} tokens")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


class PackingCollator:
    """Batches items like `VLMCollator`, packed (module docstring). `capacity` None: the
    longest item of each batch. Adds `position_ids` [rows, T]; `attention_mask` is None."""

    def __init__(self, pad_token_id: int | None, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"packing capacity must be >= 1, got {capacity}")
        self.base = VLMCollator(pad_token_id)
        self.capacity = capacity

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept = [item for item in items if "skipped" not in item]
        if not kept:
            return self.base(items)
        lengths = [len(item["input_ids"]) for item in kept]
        rows = pack_rows(lengths, self.capacity or max(lengths))
        packed = [self._join([kept[i] for i in row]) for row in rows]
        batch = self.base(packed + [item for item in items if "skipped" in item])
        width = batch["input_ids"].shape[1]
        positions = torch.zeros(len(packed), width, dtype=torch.long)
        for r, item in enumerate(packed):
            pos = item["position_ids"]
            positions[r, : len(pos)] = pos
            positions[r, len(pos):] = torch.arange(width - len(pos))  # padding: a segment of its own
        batch["position_ids"] = positions
        batch["attention_mask"] = None
        batch["rows"] = [item["sample_ids"] for item in packed]  # batch["ids"] names rows "a+b"
        return batch

    @staticmethod
    def _join(items: list[dict[str, Any]]) -> dict[str, Any]:
        labels = []
        for item in items:
            row = torch.as_tensor(item["labels"], dtype=torch.long).clone()
            row[0] = IGNORE_INDEX
            labels.append(row)
        key = image_field(items)
        images = [item[key] for item in items if item.get("num_images", 0)]
        joined = {
            "id": "+".join(str(item["id"]) for item in items),
            "sample_ids": [item["id"] for item in items],
            "input_ids": torch.cat([torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(item["input_ids"])) for item in items]),
            "num_images": sum(int(item.get("num_images", 0)) for item in items),
            key: torch.cat(images) if images else None,
        }
        return joined


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]], packed: bool = False) -> float:
    """Fraction of the token slots of `batches` (lists of indices into `lengths`) that are
    padding, padded to each batch's longest item, or, `packed`, after `pack_rows` per batch."""
    slots = tokens = 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        longest = max(sizes)
        rows = len(pack_rows(sizes, longest)) if packed else len(sizes)
        slots += rows * longest
        tokens += sum(sizes)
    return 1 - tokens / slots if slots else 0.0


@torch.no_grad()
def check_packed_attention(llm: torch.nn.Module, autocast: Any = None) -> None:
    """Refuse packing when `llm` would attend across packed samples.

    Packing relies on the model building a block-diagonal mask from position ids that restart
    at 0 (stock transformers 5.x models do, for eager, sdpa and flash attention; a remote-code
    or older model class may not, and would then silently mix samples). The probe packs two
    short samples into a row twice, with different tokens in the first sample: the second
    sample's hidden states must not move. Run it where training runs (device, `autocast`): the
    same kernels compute the second sample from the same inputs, so isolated attention leaves
    it unchanged to the bit, and mixing moves it by far more than the tolerance."""
    vocab = llm.get_input_embeddings().weight.shape[0]
    device = llm.get_input_embeddings().weight.device
    first = torch.arange(12, device=device).remainder(vocab)[None]
    other = first.clone()
    other[:, :5] = (other[:, :5] + 7).remainder(vocab)  # a different first sample, the same second
    positions = torch.cat([torch.arange(5), torch.arange(7)]).to(device)[None]

    def second_sample(ids: torch.Tensor) -> torch.Tensor:  # as in training: no cache, no mask
        out = llm(input_ids=ids, position_ids=positions, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][:, 5:].float()

    was_training = llm.training
    llm.eval()  # (no dropout: the two runs must be comparable)
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            a, b = second_sample(first), second_sample(other)
    finally:
        llm.train(was_training)
    moved = (a - b).abs().max().item()
    if moved > 1e-4 * max(a.abs().max().item(), 1.0):
        raise ValueError(
            f"data.packing=true, but {type(llm).__name__} attends across packed samples: changing the first of two "
            f"packed samples moved the second by {moved:.3g} (it must not move). Its attention does not derive a "
            "per-sample mask from restarting position ids; set data.packing=false."
        )
