"""Frozen-encoder feature cache: vision features computed once, stored on disk, reused.

In the align stage the vision tower is frozen and the image transform deterministic, so every
epoch recomputes the same features: decoding, resizing and a full tower forward per image.
The cache computes them once (`FeatureCache.fill`) and the dataset then hands the adapter the
stored features instead of pixels.

Layout of `<root>/<encoder key>/`, append-only:

- `shard-<n>.bin`: raw rows `[N_patches, D]` in the encoder's output dtype (bf16 stored as
  its 16 bits), one after the other; `np.memmap(path, dtype, mode="r").reshape(-1, N, D)`
  reads it. Shards grow to `shard_bytes` (1 GiB by default), so LLaVA-558K with ViT-L/14-336
  features (1.2 MB per image) fits in ~650 shards.
- `shard-<n>.json`: the shard's manifest, written (atomically) after the `.bin` is complete,
  so a shard exists only once both are there and a fill killed half-way loses one partial
  shard, never the index. It lists each row's image key and, for image files, the path, size
  and mtime the key was computed from.

Nothing is ever rewritten: adding images adds shards. Reads open the shard, read one row at
its offset and close it again, so no file handles are held however many shards there are.

- The image key is the SHA-256 of the image file's bytes (of the pixels and mode for an
  in-memory PIL image), so a changed file gets a new key and a renamed one is still found.
  Hashing happens once per file: afterwards a file whose (path, size, mtime) are as recorded
  is looked up without being read, as `make` does. A file rewritten in place keeping both
  its size and its mtime would keep its old features.
- The encoder key hashes everything that changes the features: the encoder class, every weight
  tensor, `feature_layer`, `keep_cls`, the transform's repr and the autocast dtype of the run.
  Any change gives a new directory: stale features are never read.

Features are stored in the dtype the encoder produced them in, so a run with the cache
computes exactly the losses of a run without it.
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
_STORED = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16,
           torch.int32: np.int32}  # (int32: a native model's VQ codes)
_DTYPES = {str(t).removeprefix("torch."): t for t in _STORED}


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


def content_key(image: Any, image_root: str | os.PathLike | None = None) -> str:
    """SHA-256 of the image's content: file bytes for a path or HF bytes dict, pixels for PIL."""
    h = hashlib.sha256()
    path = _file_of(image, image_root)
    if path is not None:
        h.update(path.read_bytes())
    elif isinstance(image, Image.Image):
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        h.update(image["bytes"])
    return h.hexdigest()


def _file_of(image: Any, image_root: str | os.PathLike | None) -> Path | None:
    """The file an image reference names (None for in-memory images)."""
    if isinstance(image, Image.Image) or (isinstance(image, dict) and image.get("bytes") is not None):
        return None
    return resolve_image_path(image.get("path") if isinstance(image, dict) else image, image_root)


def _file_id(record: dict) -> tuple[str, int, int]:
    """What identifies a file record without reading the file: path, size, mtime."""
    return record["file"], record["size"], record["mtime_ns"]


class FeatureCache:
    """Features of one encoder (identified by `key`, see `encoder_key`) under `root`."""

    def __init__(self, root: str | os.PathLike, key: str, shard_bytes: int = 1 << 30) -> None:
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self._rows: dict[str, tuple[int, int]] | None = None  # image key -> (shard, row)
        self._files: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> image key
        self._shards: dict[int, dict[str, Any]] = {}  # shard -> {"dtype", "shape"}

    @property
    def rows(self) -> dict[str, tuple[int, int]]:
        if self._rows is None:
            self._rows = {}
            for path in sorted(self.dir.glob("shard-*.json")):
                try:
                    manifest = json.loads(path.read_text())
                except (OSError, ValueError) as err:  # e.g. cut off by a power loss: its rows are refilled
                    logger.warning("feature cache: ignoring unreadable manifest %s (%s)", path, err)
                    continue
                self._register(manifest)
        return self._rows

    def _register(self, manifest: dict) -> None:
        shard = manifest["shard"]
        if manifest["rows"]:
            self._shards[shard] = {"dtype": manifest["dtype"], "shape": tuple(manifest["shape"])}
        for row, entry in enumerate(manifest["rows"]):
            self._rows[entry["key"]] = (shard, row)
        for entry in manifest["rows"] + manifest.get("files", []):
            if entry.get("file") is not None:
                self._files[_file_id(entry)] = entry["key"]

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def key_of(self, image: Any, image_root: str | os.PathLike | None = None) -> str:
        """The content key of an image reference; a file already hashed is not read again."""
        return self._identify(image, image_root)[0]

    def _identify(self, image: Any, image_root: str | os.PathLike | None) -> tuple[str, dict | None]:
        """(content key, the file record it belongs to; None for an in-memory image)."""
        self.rows  # noqa: B018 (loads the manifests, which hold the known files)
        path = _file_of(image, image_root)
        if path is None:
            return content_key(image, image_root), None
        stat = path.stat()
        file = {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = self._files.get(_file_id(file))
        return (known if known is not None else content_key(image, image_root)), file

    def get(self, key: str) -> torch.Tensor:
        """Stored features `[N_patches, D]` of the image with content key `key`."""
        if key not in self.rows:
            raise KeyError(f"image {key[:12]}... is not in the feature cache {self.dir}; fill it first")
        shard, row = self.rows[key]
        info = self._shards[shard]
        dtype = _DTYPES[info["dtype"]]
        row_bytes = int(np.prod(info["shape"])) * dtype.itemsize
        with open(self.dir / f"shard-{shard:05d}.bin", "rb") as f:
            f.seek(row * row_bytes)
            data = bytearray(f.read(row_bytes))
        if len(data) != row_bytes:
            raise OSError(f"{self.dir / f'shard-{shard:05d}.bin'} is truncated (row {row}); delete the cache")
        return torch.frombuffer(data, dtype=dtype).view(info["shape"])

    def add(self, keys: Sequence[str], features: torch.Tensor, files: Sequence[dict | None] | None = None) -> None:
        """Store `features[i]` under `keys[i]` as one new shard (`files[i]`: the path/size/mtime
        the key was computed from, or None)."""
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} feature rows")
        if keys:
            writer = self._writer()
            writer.write(keys, features, files or [None] * len(keys))
            writer.close()

    def _writer(self) -> "_ShardWriter":
        self.rows  # noqa: B018 (loads the manifests: the new shard's number follows theirs)
        shard = 1 + max(self._shards, default=-1)
        while True:  # claim the number (an empty file, created only if absent): two fills never share one
            try:
                os.close(os.open(self.dir / f"shard-{shard:05d}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return _ShardWriter(self, shard)
            except FileExistsError:
                shard += 1

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

        todo: dict[str, tuple[Any, dict | None]] = {}
        aliases = []  # files whose content is cached (or about to be) under another path: no rehash later
        for image in images:
            try:
                key, file = self._identify(image, image_root)
            except OSError as err:
                if on_error == "raise":
                    raise SampleError(None, f"cannot read image for the feature cache: {err}") from err
                continue
            if key not in self.rows and key not in todo:
                todo[key] = (image, file)
            elif file is not None and _file_id(file) not in self._files:
                aliases.append({"key": key, **file})
        device = next(encoder.parameters()).device
        writer, done = None, 0
        items = list(todo.items())
        for start in range(0, len(items), batch_size):
            keys, files, pixels = [], [], []
            for key, (image, file) in items[start:start + batch_size]:
                try:
                    pixels.append(encoder.transform(load_image(image, image_root)))
                except SampleError:
                    if on_error == "raise":
                        raise
                    continue
                keys.append(key)
                files.append(file)
            if not keys:
                continue
            with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
                features = encoder(torch.stack(pixels).to(device))
            writer = writer or self._writer()
            writer.write(keys, features, files)
            if writer.bytes >= self.shard_bytes:
                writer.close()
                writer = None
            done += len(keys)
        if writer is not None:
            writer.close()
        if aliases:
            alias_writer = self._writer()
            alias_writer.aliases = list({_file_id(a): a for a in aliases}.values())
            alias_writer.close()
        if done:
            logger.info("feature cache %s: computed %d image(s), %d cached", self.dir, done, len(self.rows))
        return done


class _ShardWriter:
    """Appends rows to one new shard; `close` publishes it (manifest last, atomically)."""

    def __init__(self, cache: FeatureCache, shard: int) -> None:
        self.cache, self.shard = cache, shard
        self.tmp = cache.dir / f".shard-{shard:05d}.bin.tmp"
        self.file = None  # opened by the first write: a shard of aliases only has no rows
        self.rows: list[dict] = []
        self.aliases: list[dict] = []  # file records of content stored in other shards
        self.dtype: torch.dtype | None = None
        self.shape: tuple[int, ...] | None = None
        self.bytes = 0

    def write(self, keys: Sequence[str], features: torch.Tensor, files: Sequence[dict | None]) -> None:
        if features.dtype not in _STORED:
            raise ValueError(f"cannot store features of dtype {features.dtype}")
        if self.dtype is None:
            self.dtype, self.shape = features.dtype, tuple(features.shape[1:])
        if (features.dtype, tuple(features.shape[1:])) != (self.dtype, self.shape):
            raise ValueError(f"features {features.dtype} {tuple(features.shape[1:])} differ from the shard's "
                             f"{self.dtype} {self.shape}")
        data = features.detach().cpu().contiguous()
        array = (data.view(torch.uint16) if data.dtype == torch.bfloat16 else data).numpy()
        self.file = self.file or open(self.tmp, "wb")
        self.file.write(array.tobytes())
        self.bytes += array.nbytes
        self.rows += [{"key": key, **(file or {})} for key, file in zip(keys, files)]

    def close(self) -> None:
        d = self.cache.dir
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, d / f"shard-{self.shard:05d}.bin")
        manifest = {"shard": self.shard, "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
                    "shape": list(self.shape) if self.shape else None, "rows": self.rows, "files": self.aliases}
        tmp = d / f".shard-{self.shard:05d}.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / f"shard-{self.shard:05d}.json")
        directory = os.open(d, os.O_RDONLY)
        try:
            os.fsync(directory)  # the renames reach the disk too
        finally:
            os.close(directory)
        self.cache._register(manifest)


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
    return cache.get(cache.key_of(image, image_root))


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
