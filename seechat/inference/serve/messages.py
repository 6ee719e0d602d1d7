"""OpenAI chat messages -> seechat turns, with every image part checked before it is decoded.

`to_conversation` only looks at the JSON: it counts image parts (over `max_images` is a 400
before any image is touched), checks data URLs by their length and local paths as strings
(no NUL, no control character, bounded length, inside `--image-dir`) before the filesystem
sees them, and keeps each image as an `ImageRef`. `decode` turns a reference into pixels; the
routes call it under a semaphore, so that image decoding over all requests is bounded.
Errors never repeat what the server knows (resolved paths, library messages).
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seechat.data import SampleError, load_image
from seechat.inference.serve.errors import APIError, log
from seechat.inference.serve.limits import Limits, check_text
from seechat.models.llm import IMAGE_TOKEN
from seechat.models.prompting import user_text

ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}
MAX_PATH_CHARS = 1024


@dataclass(frozen=True)
class ImageRef:
    """An image a request names, not yet decoded: raw bytes of a data URL, or a checked path."""

    where: str
    data: bytes | None = None
    path: Path | None = None


def _data_url(url: str, where: str, limits: Limits) -> ImageRef:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise APIError(400, f"{where}: data URL must be base64-encoded (data:image/png;base64,...)", where)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(400, f"{where}: image is larger than {limits.max_image_bytes / 2**20:g} MiB", where,
                       "invalid_image")
    try:
        return ImageRef(where, data=base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: data URL is not valid base64", where, "invalid_image") from None


def _local_path(url: str, where: str, image_dir: Path | None) -> ImageRef:
    if image_dir is None:
        raise APIError(400, f"{where}: local image paths are disabled; start the server with --image-dir", where)
    name = url.removeprefix("file://")
    if (not name or len(name) > MAX_PATH_CHARS or any(ord(c) < 32 for c in name)
            or any(len(part) > 255 for part in name.split("/"))):
        raise APIError(400, f"{where}: not a usable image path (empty, over {MAX_PATH_CHARS} characters, a "
                            "component over 255, or a control character)", where)
    # No expanduser: `~name` is a file name here, not another user's home.
    try:
        path = Path(name) if os.path.isabs(name) else image_dir / name
        path = path.resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, odd names
        raise APIError(400, f"{where}: not a usable image path", where) from None
    if not path.is_relative_to(image_dir):
        raise APIError(400, f"{where}: the path is outside the server's image directory", where)
    return ImageRef(where, path=path)


def image_ref(part: dict, where: str, image_dir: Path | None, limits: Limits) -> ImageRef:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise APIError(400, f"{where}: image_url.url must be a string", where)
    if url.startswith("data:"):
        return _data_url(url, where, limits)
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: remote image URLs are not fetched; send the image as a data URL", where)
    return _local_path(check_text(url, where), where, image_dir)


def _parts(message: Any, i: int) -> tuple[str, list]:
    if not isinstance(message, dict):
        raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise APIError(400, f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}].role")
    if content is None and role == "assistant":
        content = ""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise APIError(400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
    return role, parts


def to_conversation(messages: list, image_dir: Path | None, limits: Limits,
                    max_chars: int) -> tuple[list[dict], list[ImageRef]]:
    """OpenAI messages -> seechat turns (a turn's images first, as seechat writes them) + the
    images, undecoded. `max_chars` bounds all text together (checked before tokenising)."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    turns, images, chars = [], [], 0
    for i, message in enumerate(messages):
        role, parts = _parts(message, i)
        texts, turn_images = [], []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text", ""), str):
                texts.append(check_text(part.get("text", ""), where))
                if IMAGE_TOKEN in texts[-1]:  # the image marker: images come as image_url parts only
                    raise APIError(400, f"{where}: text must not contain {IMAGE_TOKEN}; send images as image_url "
                                        "parts", where)
                chars += len(texts[-1])
            elif kind == "image_url" and role == "user":
                if len(images) + len(turn_images) >= limits.max_images:
                    raise APIError(400, f"more than {limits.max_images} images in one request; at most "
                                        f"{limits.max_images}", "messages")
                turn_images.append(image_ref(part, where, image_dir, limits))
            else:
                raise APIError(400, f"{where}: unsupported content part for role {role!r} (text"
                                    + (" or image_url)" if role == "user" else " only)"), where)
        if chars > max_chars:
            raise APIError(400, f"the messages hold over {max_chars:,} characters, more than the model's context "
                                "can take; shorten them", "messages", "context_length_exceeded")
        turns.append({"from": ROLES[message["role"]], "value": user_text(" ".join(texts), len(turn_images))})
        images += turn_images
    if turns[-1]["from"] != "human":
        raise APIError(400, "the last message must come from the user", f"messages[{len(messages) - 1}].role")
    return turns, images


def decode(ref: ImageRef, limits: Limits, transform, rid: str | None):
    """Pixels of one image (the model's transform applied), or a 400 that names the part only."""
    source: Any = {"bytes": ref.data, "path": "image"} if ref.data is not None else ref.path
    try:
        image = load_image(source, max_pixels=limits.max_image_pixels)
    except SampleError as err:
        log.info("request %s: %s: %s", rid, ref.where, err)
        if "pixels, over the limit" in err.problem:
            message = f"{ref.where}: image has more than {limits.max_image_pixels:,} pixels"
        elif "not found" in err.problem:
            message = f"{ref.where}: no such image in the server's image directory"
        else:
            message = f"{ref.where}: cannot read image (damaged, or not an image format the server reads)"
        raise APIError(400, message, ref.where, "invalid_image") from None
    return transform(image)
