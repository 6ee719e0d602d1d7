"""A recipe's data section in, a map-style `VLMDataset` out: `data.format` picks the reader,
`data.max_samples` cuts the records, the model supplies tokenizer, image transform and the
number of image tokens.

The dataset is map-style on purpose: the training loop shuffles it with a seeded sampler (or
groups it by length), resumes at an exact batch position, fills the feature cache from its
image list, and checks its ids for conflicts before step one; none of that exists for a
stream.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from seechat.data.dataset import VLMDataset
from seechat.data.readers import load_hf_dataset, read_llava_records


class ModelInputs(Protocol):
    """What a dataset needs from the model it feeds (every seechat model kind has these)."""

    tokenizer: PreTrainedTokenizerBase
    num_image_tokens: int
    image_transform: Callable[[Image.Image], torch.Tensor]


def build_dataset(recipe: dict, model: ModelInputs, split: str = "train") -> VLMDataset:
    """The dataset of `recipe["data"][split]` (a LLaVA JSON/JSONL file or a Hugging Face dataset)."""
    data = recipe["data"]
    source = data.get(split)
    if not source:
        raise ValueError(f"data.{split} is not set: point it at a LLaVA JSON/JSONL file or a dataset")
    if data["format"] == "llava":
        samples: Any = read_llava_records(source, on_error=data["on_error"])
    elif data["format"] == "hf":
        samples = load_hf_dataset(source, split=data["hf_split"])
    else:
        raise ValueError(f"data.format={data['format']!r}; valid: llava, hf")
    if data.get("max_samples"):
        n = data["max_samples"]
        if hasattr(samples, "records"):
            samples.records, samples.sources = samples.records[:n], samples.sources[:n]
        else:
            samples = samples.select(range(min(n, len(samples))))
    return VLMDataset(
        samples,
        tokenizer=model.tokenizer,
        image_transform=model.image_transform,
        num_image_tokens=model.num_image_tokens,
        max_length=data["max_length"],
        truncation=data["truncation"],
        on_error=data["on_error"],
        image_root=data["image_root"],
    )
