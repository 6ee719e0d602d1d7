"""Image loading: a path, raw bytes or a PIL image in, a fully decoded RGB PIL image out.

Decoding happens here, eagerly, so that a missing, truncated or corrupt file becomes a
`SampleError` naming the file, raised in the DataLoader worker that can skip the sample -
not a cryptic PIL error in the middle of the image transform.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from seechat.data.schema import SampleError


def resolve_image_path(path: str | os.PathLike, image_root: str | os.PathLike | None) -> Path:
    """`path` as stored in the data, made absolute against `image_root` when it is relative
    (LLaVA stores paths relative to the image folder, e.g. "coco/train2017/000001.jpg")."""
    path = Path(path).expanduser()
    if image_root is not None and not path.is_absolute():
        path = Path(image_root).expanduser() / path
    return path


def load_image(
    path_or_pil: str | os.PathLike | Image.Image | dict[str, Any],
    image_root: str | os.PathLike | None = None,
    sample_id: str | None = None,
) -> Image.Image:
    """Decode one image to RGB. Accepts a path (resolved against `image_root`), a PIL image,
    or a Hugging Face `Image(decode=False)` dict `{"bytes": ..., "path": ...}`. Raises
    `SampleError` (naming `sample_id` and the file) if the image cannot be read."""
    if isinstance(path_or_pil, Image.Image):
        return path_or_pil if path_or_pil.mode == "RGB" else path_or_pil.convert("RGB")

    if isinstance(path_or_pil, dict):
        data, stored_path = path_or_pil.get("bytes"), path_or_pil.get("path")
        if data is not None:
            return _decode(io.BytesIO(data), stored_path or "<image bytes>", sample_id)
        if not stored_path:
            raise SampleError(sample_id, "image entry has neither 'bytes' nor 'path'")
        path_or_pil = stored_path

    if not isinstance(path_or_pil, (str, os.PathLike)):
        raise SampleError(sample_id, f"image entry of type {type(path_or_pil).__name__} is not a path or image")
    path = resolve_image_path(path_or_pil, image_root)
    if not path.is_file():
        hint = "" if image_root is not None or path.is_absolute() else "; relative path: set image_root"
        raise SampleError(sample_id, f"image file not found{hint}", file=str(path))
    return _decode(path, str(path), sample_id)


def _decode(source: Path | io.BytesIO, name: str, sample_id: str | None) -> Image.Image:
    try:
        with Image.open(source) as image:
            # open() only reads the header; load() decodes the pixels, which is what detects a
            # truncated or corrupt file.
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports damage through all of these, depending on the format and where it breaks.
        raise SampleError(sample_id, f"cannot read image: {type(err).__name__}: {err}", file=name) from err
