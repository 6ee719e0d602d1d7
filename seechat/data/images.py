"""Image loading: a path, raw bytes or a PIL image in, a fully decoded RGB PIL image out.

Decoding happens here, eagerly, so that a missing, truncated or corrupt file becomes a
`SampleError` naming the file, raised in the DataLoader worker that can skip the sample -
not a cryptic PIL error in the middle of the image transform.

Conversion to RGB is explicit about the modes where PIL's plain `convert("RGB")` is wrong for
a vision encoder: the EXIF orientation of photos is applied (cameras store portrait shots
sideways), transparent pixels are composited onto white instead of showing whatever colour
the file stores under alpha 0, and 16-bit greyscale is scaled to 8 bits instead of clipped
(PIL maps every value above 255 to white). Images over `MAX_IMAGE_PIXELS` are refused from
their header, before any pixel is decoded (decompression bombs).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seechat.data.schema import SampleError

# PIL's own default (~89.5 megapixels, a 9459x9459 image): far above any encoder input, and
# refused outright here, whereas PIL only warns between it and twice it. Passed per call
# rather than set on the PIL module, so importing seechat changes nothing for other code.
MAX_IMAGE_PIXELS = 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


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
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode one image to RGB (see the module docstring for how modes convert). Accepts a
    path (resolved against `image_root`), a PIL image, or a Hugging Face `Image(decode=False)`
    dict `{"bytes": ..., "path": ...}`. Raises `SampleError` (naming `sample_id` and the file)
    if the image cannot be read or has more than `max_pixels` pixels."""
    if isinstance(path_or_pil, Image.Image):
        return to_rgb(path_or_pil)

    if isinstance(path_or_pil, dict):
        data, stored_path = path_or_pil.get("bytes"), path_or_pil.get("path")
        if data is not None:
            return _decode(io.BytesIO(data), stored_path or "<image bytes>", sample_id, max_pixels)
        if not stored_path:
            raise SampleError(sample_id, "image entry has neither 'bytes' nor 'path'")
        path_or_pil = stored_path

    if not isinstance(path_or_pil, (str, os.PathLike)):
        raise SampleError(sample_id, f"image entry of type {type(path_or_pil).__name__} is not a path or image")
    path = resolve_image_path(path_or_pil, image_root)
    if not path.is_file():
        hint = "" if image_root is not None or path.is_absolute() else "; relative path: set image_root"
        raise SampleError(sample_id, f"image file not found{hint}", file=str(path))
    return _decode(path, str(path), sample_id, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: EXIF orientation applied, transparency composited onto white,
    16-bit greyscale scaled (not clipped) to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        # 0..65535 -> 0..255, rounded; PIL's convert() would clip at 255 instead.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _decode(source: Path | io.BytesIO, name: str, sample_id: str | None, max_pixels: int) -> Image.Image:
    try:
        with Image.open(source) as image:
            # open() only reads the header, so a bomb is refused before it is decoded.
            if image.width * image.height > max_pixels:
                raise SampleError(
                    sample_id,
                    f"image is {image.width}x{image.height} = {image.width * image.height:,} pixels, over the "
                    f"limit of {max_pixels:,} (a decompression bomb, or far larger than any encoder input)",
                    file=name,
                )
            # load() decodes the pixels, which is what detects a truncated or corrupt file.
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, SampleError):
            raise
        # PIL reports damage through all of these, depending on the format and where it breaks.
        raise SampleError(sample_id, f"cannot read image: {type(err).__name__}: {err}", file=name) from err
