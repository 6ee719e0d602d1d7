"""Frozen-encoder feature cache: vision features computed once, stored on disk, reused.

In the align stage the vision tower is frozen and the image transform deterministic, so every
epoch recomputes the same features: decoding, resizing and a full tower forward per image.
The cache computes them once (`FeatureCache.fill`) and the dataset then hands the adapter the
stored features instead of pixels.

Layout: `<root>/<encoder key>/index.json` maps an image key to (shard, row), and each
`features-<n>.npy` shard holds `[rows, N_patches, D]` features, read memory-mapped.

- The image key is the SHA-256 of the image file's bytes (of the pixels and mode for an
  in-memory PIL image), so a changed file gets a new key and a renamed one is still found.
- The encoder key hashes everything that changes the features: the encoder class, every weight
  tensor, `feature_layer`, `keep_cls`, the transform's repr and the autocast dtype of the run.
  Any change gives a new directory: stale features are never read.

Features are stored in the dtype the encoder produced them in (bf16 as uint16 bits), so a run
with the cache computes exactly the losses of a run without it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from seechat.data.images import load_image, resolve_image_path

logger = logging.getLogger(__name__)

# Transforms whose output depends on a random draw: features of one image would differ per epoch.
_RANDOM_TRANSFORMS = ("Random", "ColorJitter", "RandAugment", "AutoAugment", "TrivialAugment",
                      "AugMix", "GaussianBlur", "ElasticTransform")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def transform_is_deterministic(transform: Callable) -> bool:
    """False when `transform` (or a step of a torchvision Compose) is a random augmentation."""
    steps = getattr(transform, "transforms", [transform])
    return not any(type(step).__name__.startswith(_RANDOM_TRANSFORMS) for step in steps)


def encoder_key(encoder: torch.nn.Module, compute_dtype: torch.dtype | None) -> str:
    """A short hash of everything that determines the encoder's features (module docstring)."""
    h = hashlib.sha256()
    parts = [type(encoder).__name__, getattr(encoder, "feature_layer", None),
             getattr(encoder, "keep_cls", None), repr(getattr(encoder, "transform", None)), str(compute_dtype)]
    h.update(json.dumps(parts, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def image_key(image: Any, image_root: str | os.PathLike | None = None) -> str:
    """SHA-256 of the image's content: file bytes for a path or HF bytes dict, pixels for PIL."""
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, dict) and image.get("bytes") is not None:
        h.update(image["bytes"])
    else:
        path = image.get("path") if isinstance(image, dict) else image
        h.update(resolve_image_path(path, image_root).read_bytes())
    return h.hexdigest()


class FeatureCache:
    """Features of one encoder (identified by `key`, see `encoder_key`) under `root`."""

    def __init__(self, root: str | os.PathLike, key: str) -> None:
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, list] | None = None
        self._meta: dict[str, Any] = {}
        self._shards: dict[int, np.ndarray] = {}  # opened lazily: DataLoader workers open their own

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}

    @property
    def index(self) -> dict[str, list]:
        if self._index is None:
            path = self.dir / "index.json"
            data = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "items": {}}
            self._index, self._meta = data["items"], data["meta"]
        return self._index

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> torch.Tensor:
        """Stored features `[N_patches, D]` of the image with content key `key`."""
        if key not in self.index:
            raise KeyError(f"image {key[:12]}... is not in the feature cache {self.dir}; fill it first")
        shard, row = self.index[key]
        if shard not in self._shards:
            self._shards[shard] = np.load(self.dir / f"features-{shard:05d}.npy", mmap_mode="r")
        array = torch.from_numpy(np.array(self._shards[shard][row]))
        return array.view(torch.bfloat16) if self._meta.get("dtype") == "bfloat16" else array

    def add(self, keys: Sequence[str], features: torch.Tensor) -> None:
        """Store `features[i]` under `keys[i]` as a new shard; the index is replaced atomically."""
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} feature rows")
        if not keys:
            return
        dtype = features.dtype
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"cannot store features of dtype {dtype}")
        index = self.index
        if self._meta.get("dtype", str(dtype).removeprefix("torch.")) != str(dtype).removeprefix("torch."):
            raise ValueError(f"cache {self.dir} holds {self._meta['dtype']} features, got {dtype}")
        self._meta["dtype"] = str(dtype).removeprefix("torch.")
        shard = 1 + max((s for s, _ in index.values()), default=-1)
        data = features.detach().cpu().contiguous()
        array = (data.view(torch.uint16) if dtype == torch.bfloat16 else data).numpy()
        tmp = self.dir / f".features-{shard:05d}.npy"
        np.save(tmp, array)
        os.replace(tmp, self.dir / f"features-{shard:05d}.npy")
        for row, key in enumerate(keys):
            index[key] = [shard, row]
        tmp_index = self.dir / ".index.json"
        tmp_index.write_text(json.dumps({"meta": self._meta, "items": index}))
        os.replace(tmp_index, self.dir / "index.json")

    @torch.no_grad()
    def fill(
        self,
        images: Iterable[Any],
        encoder: torch.nn.Module,
        image_root: str | os.PathLike | None = None,
        batch_size: int = 32,
        compute_dtype: torch.dtype | None = None,
        on_error: str = "raise",
    ) -> int:
        """Compute and store the features of every image of `images` not yet cached (each
        distinct content once). Returns the number of images computed. Unreadable images raise
        (`on_error="raise"`) or are left out; the dataset then meets them and skips the sample."""
        from seechat.data.schema import SampleError

        todo: dict[str, Any] = {}
        for image in images:
            try:
                key = image_key(image, image_root)
            except OSError as err:
                if on_error == "raise":
                    raise SampleError(None, f"cannot read image for the feature cache: {err}") from err
                continue
            if key not in self.index and key not in todo:
                todo[key] = image
        device = next(encoder.parameters()).device
        keys, pending, done = [], [], 0
        items = list(todo.items())
        for i, (key, image) in enumerate(items):
            try:
                pending.append(encoder.transform(load_image(image, image_root)))
                keys.append(key)
            except SampleError:
                if on_error == "raise":
                    raise
            if len(pending) == batch_size or (i == len(items) - 1 and pending):
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
                    features = encoder(torch.stack(pending).to(device))
                self.add(keys, features)
                done += len(keys)
                keys, pending = [], []
        if done:
            logger.info("feature cache %s: computed %d image(s), %d cached", self.dir, done, len(self.index))
        return done


def image_entries(records: Iterable[Any]) -> Iterable[Any]:
    """Every image reference of LLaVA-style records ("images" list or single "image")."""
    for raw in records:
        if not isinstance(raw, dict):
            continue
        value = raw.get("images") if raw.get("images") is not None else raw.get("image")
        if value is None:
            continue
        yield from (value if isinstance(value, (list, tuple)) else [value])


def load_features(cache: FeatureCache, image: Any, image_root: str | os.PathLike | None) -> torch.Tensor:
    """Cached features of one image reference (for the dataset)."""
    return cache.get(image_key(image, image_root))


def resolve_feature_cache(
    setting: str | None, encoder_mode: str, encoder: torch.nn.Module, compute_dtype: torch.dtype | None,
    default_root: str | os.PathLike,
) -> FeatureCache | None:
    """The recipe's `data.feature_cache`: "off" (or None) -> no cache; "auto" -> a cache under
    `default_root` when the encoder is frozen and its transform deterministic, else none; any
    other string -> a cache in that directory, which those two conditions must allow."""
    if setting in (None, "off", False):
        return None
    reasons = []
    if encoder_mode != "frozen":
        reasons.append(f"the encoder trains (encoder.mode={encoder_mode})")
    if not transform_is_deterministic(encoder.transform):
        reasons.append(f"the image transform is random ({encoder.transform!r})")
    if reasons:
        if setting == "auto":
            logger.info("feature cache off: %s", "; ".join(reasons))
            return None
        raise ValueError(f"data.feature_cache={setting!r} needs a frozen encoder and a deterministic "
                         f"transform, but {'; '.join(reasons)}. Set data.feature_cache=off.")
    root = default_root if setting == "auto" else setting
    return FeatureCache(root, encoder_key(encoder, compute_dtype))
