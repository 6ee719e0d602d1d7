"""Batching: dataset items (see `VLMDataset.__getitem__`) in, one padded batch out.

Images of a batch are not padded per sample: every image of every sample is concatenated in
sample order into one `[sum(num_images), 3, H, W]` tensor, and `num_images` says how many
belong to each row, so a text-only sample costs nothing and a four-image sample needs no
special case. Skipped items are left out of the tensors and reported in `skipped`.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from seechat.data.tokenization import IGNORE_INDEX


def image_field(items: Sequence[dict[str, Any]]) -> str:
    """Items from a feature cache carry encoder outputs ("image_features") instead of pixels
    ("pixel_values"); either is batched the same way."""
    return "image_features" if any(item.get("image_features") is not None for item in items) else "pixel_values"


class VLMCollator:
    """Pads `input_ids` with `pad_token_id` and `labels` with -100 to the longest item.
    `padding_side="left"` is for batched generation, where every prompt must end at the same
    position."""

    def __init__(
        self,
        pad_token_id: int | None,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer has no pad token. Add one "
                "(seechat.models.llm.load_tokenizer does) or pass e.g. tokenizer.eos_token_id."
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: Sequence[torch.Tensor], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row) :] = row
        return out

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = [(item["id"], item["skipped"]) for item in items if "skipped" in item]
        kept = [item for item in items if "skipped" not in item]
        if not kept:
            # The training loop recognises this by input_ids None and moves on.
            return {"input_ids": None, "attention_mask": None, "labels": None, "pixel_values": None,
                    "num_images": None, "ids": [], "skipped": skipped}

        ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in kept]
        length = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ones = [torch.ones(len(row), dtype=torch.long) for row in ids]
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids, length, self.pad_token_id),
            "attention_mask": self._pad(ones, length, 0),
        }
        # Generation batches come without labels.
        if all("labels" in item for item in kept):
            labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in kept]
            batch["labels"] = self._pad(labels, length, IGNORE_INDEX)
        else:
            batch["labels"] = None

        num_images = [int(item.get("num_images", 0)) for item in kept]
        key = image_field(kept)
        images = [item[key] for item, n in zip(kept, num_images) if n > 0]
        for item, n in zip(kept, num_images):
            pixels = item.get(key)
            rows = 0 if pixels is None else len(pixels)
            if rows != n:
                raise ValueError(f"item {item['id']!r} says num_images={n} but has {rows} image rows")
        shapes = {tuple(pixels.shape[1:]) for pixels in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images of one batch differ in shape {sorted(shapes)}; the image transform must "
                "resize every image to the encoder's input size"
            )
        batch["pixel_values"] = torch.cat(images) if images and key == "pixel_values" else None
        if key == "image_features":
            batch["image_features"] = torch.cat(images)
        batch["num_images"] = torch.tensor(num_images, dtype=torch.long)
        batch["ids"] = [item["id"] for item in kept]
        batch["skipped"] = skipped
        return batch
