"""Datasets: raw records in, model-ready items out, one sample at a time.

Everything per sample - normalising, templating, tokenising, decoding and transforming images -
runs in `__getitem__`, i.e. in DataLoader workers, so the main process never decodes an image
and a bad sample costs one item, not the run. An item is

    {"id": str, "input_ids": LongTensor[L], "labels": LongTensor[L],
     "pixel_values": FloatTensor[num_images, 3, H, W] or None (text-only), "num_images": int}

(with a feature cache, "image_features" [num_images, N_patches, D] replaces the pixels)

or, for a sample that is skipped, `{"id": str, "skipped": reason}`, which `VLMCollator`
leaves out of the batch and reports.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from seechat.data.images import load_image
from seechat.data.readers import ReadResult
from seechat.data.schema import SampleError, normalize_sample
from seechat.data.tokenization import TruncationError, check_tokenizer, tokenize_conversation

logger = logging.getLogger("seechat.data")

# A rough characters-per-token ratio for BPE tokenizers on English text; lengths() only needs
# to rank samples, and image tokens, which dominate, are counted exactly.
_CHARS_PER_TOKEN = 4


class SampleEncoder:
    """Turns one raw record into a dataset item (see the module docstring). Shared by the
    map-style and the streaming dataset.

    on_error="skip" turns any `SampleError` (schema, template, image) into a skipped item;
    "raise" lets it propagate. A sample too long for `max_length` follows `truncation`: with
    "drop" it comes back as a skipped item whatever `on_error` says (a map-style dataset
    cannot shrink), with "raise" it is a `TruncationError` handled by `on_error`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor],
        num_image_tokens: int,
        image_token: str = "<image>",
        max_length: int | None = 2048,
        truncation: Literal["drop", "raise"] = "drop",
        on_error: Literal["raise", "skip"] = "raise",
        image_root: str | os.PathLike | None = None,
    ) -> None:
        if truncation not in ("drop", "raise"):
            raise ValueError(f"truncation must be 'drop' or 'raise', got {truncation!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        # Setup problems fail here, once, instead of as one skipped sample after another.
        check_tokenizer(tokenizer, image_token)
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.max_length = max_length
        self.truncation = truncation
        self.on_error = on_error
        self.image_root = image_root
        self.feature_cache = None  # a FeatureCache: items carry "image_features", not pixels

    def _skip(self, sample_id: str, reason: str) -> dict[str, str]:
        logger.warning("skipping sample %r: %s", sample_id, reason)
        return {"id": sample_id, "skipped": reason}

    def __call__(self, raw: Mapping[str, Any], index: int, source: str | None = None) -> dict[str, Any]:
        fallback_id = str(raw.get("id") or index) if isinstance(raw, Mapping) else str(index)
        try:
            sample = normalize_sample(raw, index, self.image_token)
            try:
                # Tokenise before decoding images: a sample dropped for length costs no decode.
                encoded = tokenize_conversation(
                    sample, self.tokenizer, self.num_image_tokens, self.image_token,
                    self.max_length, truncation="raise",
                )
            except TruncationError as err:
                if self.truncation == "drop":
                    return self._skip(sample["id"], err.problem)
                raise
            features = None
            if self.feature_cache is not None and sample["images"]:
                # Stored encoder outputs instead of pixels (seechat/data/feature_cache.py).
                images = sample["images"]
                features = torch.stack([self._cached_features(image, sample["id"]) for image in images])
                pixel_values = None
            else:
                images = [load_image(image, self.image_root, sample["id"]) for image in sample["images"]]
                pixel_values = torch.stack([self.image_transform(image) for image in images]) if images else None
        except SampleError as original:
            err = original
            if err.file is None and source is not None:
                err = type(err)(err.sample_id, err.problem, file=source)
            if self.on_error == "raise":
                raise err
            return self._skip(err.sample_id or fallback_id, str(err))
        return {
            "id": sample["id"],
            "input_ids": torch.tensor(encoded["input_ids"], dtype=torch.long),
            "labels": torch.tensor(encoded["labels"], dtype=torch.long),
            "pixel_values": pixel_values,
            "num_images": len(images),
            **({"image_features": features} if features is not None else {}),
        }

    def _cached_features(self, image: Any, sample_id: str) -> torch.Tensor:
        from seechat.data.feature_cache import load_features

        try:
            return load_features(self.feature_cache, image, self.image_root)
        except (OSError, KeyError):
            load_image(image, self.image_root, sample_id)  # an unreadable image: its SampleError
            raise

    def estimate_length(self, conversations: Any, num_images: int = 0) -> int:
        """A cheap token-count estimate for length grouping; 0 for unusable records."""
        if not isinstance(conversations, (list, tuple)):
            return 0
        text = [turn.get("value", turn.get("content")) for turn in conversations if isinstance(turn, Mapping)]
        text = [value for value in text if isinstance(value, str)]
        markers = sum(value.count(self.image_token) for value in text)
        chars = sum(len(value) for value in text) - markers * len(self.image_token)
        return chars // _CHARS_PER_TOKEN + max(markers, num_images) * self.num_image_tokens


def _raw_image_count(raw: Mapping[str, Any]) -> int:
    value = raw.get("images") if raw.get("images") is not None else raw.get("image")
    if value is None:
        return 0
    return len(value) if isinstance(value, (list, tuple)) else 1


def conflicting_ids(samples: Sequence[Any], sources: Sequence[str] | None = None) -> dict[int, int]:
    """`{index: index of the first record with that id}` for every record whose id was already
    used by a record with different content. Exact copies are not conflicts: repeating a sample
    under its id is how a data file oversamples it (easy-VQA's balanced split does)."""
    first_by_id: dict[str, tuple[int, str]] = {}
    conflicts: dict[int, int] = {}
    for index, raw in enumerate(samples):
        if not isinstance(raw, Mapping) or raw.get("id") is None:
            continue
        try:
            # A short hash, not the text: 665K records must not cost their size again in memory.
            text = json.dumps(raw, sort_keys=True, default=repr)
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        except (TypeError, ValueError):
            digest = bytes(str(id(raw)), "ascii")
        key = str(raw["id"])
        if key not in first_by_id:
            first_by_id[key] = (index, digest)
        elif first_by_id[key][1] != digest:
            conflicts[index] = first_by_id[key][0]
    return conflicts


class VLMDataset(Dataset):
    """Map-style dataset over raw records: a list of dicts, a `ReadResult` (errors then name
    the file and line), or a map-style Hugging Face `datasets.Dataset`. Arguments after
    `samples` are those of `SampleEncoder`."""

    def __init__(
        self,
        samples: Sequence[Mapping[str, Any]] | ReadResult,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor],
        num_image_tokens: int,
        image_token: str = "<image>",
        max_length: int | None = 2048,
        truncation: Literal["drop", "raise"] = "drop",
        on_error: Literal["raise", "skip"] = "raise",
        image_root: str | os.PathLike | None = None,
    ) -> None:
        self.encoder = SampleEncoder(
            tokenizer, image_transform, num_image_tokens, image_token, max_length, truncation, on_error, image_root
        )
        if isinstance(samples, ReadResult):
            self.samples: Sequence[Mapping[str, Any]] = samples.records
            self.sources: Sequence[str] | None = samples.sources
            self.read_skipped = list(samples.skipped)
        else:
            self.samples, self.sources, self.read_skipped = samples, None, []
        # Checked once, up front: with on_error="raise" a conflict stops the run before step one.
        self.conflicts = conflicting_ids(self.samples, self.sources) if isinstance(self.samples, list) else {}
        if self.conflicts and on_error == "raise":
            index, first = next(iter(self.conflicts.items()))
            raise SampleError(
                str(self.samples[index]["id"]),
                f"{len(self.conflicts)} record(s) reuse the id of a different record (this one, at "
                f"{self._where(index)}, differs from the one at {self._where(first)}); give each sample "
                "its own id, or set data.on_error=skip to skip the later copies",
            )

    def __len__(self) -> int:
        return len(self.samples)

    def use_feature_cache(self, cache: Any) -> None:
        """Serve cached encoder features (`image_features`) instead of pixels; see
        seechat/data/feature_cache.py (fill the cache first)."""
        self.encoder.feature_cache = cache

    def _where(self, index: int) -> str:
        return self.sources[index] if self.sources is not None else f"position {index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.sources[index] if self.sources is not None else None
        if index in self.conflicts:
            first = self.conflicts[index]
            return self.encoder._skip(
                f"{self.samples[index]['id']}@{self._where(index)}",
                f"id already used by a different record at {self._where(first)}",
            )
        return self.encoder(self.samples[index], index, source)

    def lengths(self) -> list[int]:
        """Estimated token length of every sample, for `LengthGroupedSampler`; cheap: no
        tokenising and no image decoding."""
        column_names = getattr(self.samples, "column_names", None)
        if column_names is not None:
            # A Hugging Face dataset: read only the text column, never decode the image column;
            # images are counted by their <image> markers.
            if "conversations" not in column_names:
                raise ValueError(f"dataset has no 'conversations' column (columns: {column_names})")
            return [self.encoder.estimate_length(turns) for turns in self.samples["conversations"]]
        return [
            self.encoder.estimate_length(raw.get("conversations"), _raw_image_count(raw))
            if isinstance(raw, Mapping) else 0
            for raw in self.samples
        ]


class IterableVLMDataset(IterableDataset):
    """Streaming variant over any iterable of raw records (e.g. a streaming Hugging Face
    dataset). With several DataLoader workers each takes every n-th record, so no record is
    seen twice; for sharded HF datasets, shard them instead (`datasets.distributed`)."""

    def __init__(self, records: Iterable[Mapping[str, Any]], **encoder_kwargs: Any) -> None:
        self.records = records
        self.encoder = SampleEncoder(**encoder_kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for index, raw in enumerate(self.records):
            if index % workers == worker_id:
                yield self.encoder(raw, index)
