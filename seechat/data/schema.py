"""The canonical sample every reader produces and every later step consumes.

A canonical sample is LLaVA's JSON record generalised to any number of images:

    {"id": str,
     "images": [path str | PIL.Image | {"bytes": ..., "path": ...}],
     "conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}

`normalize_sample` turns a raw record (LLaVA's single `"image"` key, an `"images"` list, or no
image at all) into that form and checks it, so that problems surface with the sample's id
instead of as a shape mismatch deep inside the model.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from seechat.errors import UserError

ROLES = ("human", "gpt", "system")
# Records converted from OpenAI-style chats use these names; they mean the same thing.
ROLE_ALIASES = {"user": "human", "assistant": "gpt"}


class SampleError(UserError, ValueError):
    """A sample (or the file line it came from) cannot be used. The message names the sample
    id, the file when known, and the problem, so the record can be found and fixed."""

    def __init__(self, sample_id: str | None, problem: str, file: str | None = None) -> None:
        self.sample_id = sample_id
        self.problem = problem
        self.file = file
        where = f" in {file}" if file else ""
        super().__init__(f"sample {sample_id!r}{where}: {problem}")

    def __reduce__(self) -> tuple:
        # DataLoader workers and multiprocessing pickle exceptions; the default reduce would
        # call __init__ with the formatted message only.
        return (type(self), (self.sample_id, self.problem, self.file))


def _image_list(raw: Mapping[str, Any], sample_id: str) -> list[Any]:
    single, many = raw.get("image"), raw.get("images")
    if single is not None and many:
        raise SampleError(sample_id, "has both 'image' and 'images'; keep one of them")
    value = many if many is not None else single
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        images = list(value)
    else:
        # LLaVA stores one image as a bare path string.
        images = [value]
    for image in images:
        if image is None or (isinstance(image, str) and not image.strip()):
            raise SampleError(sample_id, f"has an empty image entry in {images!r}")
        if not _is_image_entry(image):
            raise SampleError(
                sample_id, f"image entry {image!r} is a {type(image).__name__}; expected a path string, "
                "a PIL image or a {'bytes': ..., 'path': ...} dict",
            )
    return images


def _is_image_entry(image: Any) -> bool:
    if isinstance(image, (str, os.PathLike)):
        return True
    if isinstance(image, Mapping):
        return image.get("bytes") is not None or bool(image.get("path"))
    # PIL is imported lazily by the image loader; recognise its images without importing it.
    return type(image).__module__.startswith("PIL.")


def _turns(raw: Mapping[str, Any], sample_id: str) -> list[dict[str, str]]:
    conversations = raw.get("conversations")
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise SampleError(sample_id, "'conversations' must be a non-empty list of turns")
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise SampleError(sample_id, f"turn {position} is {type(turn).__name__}, not a dict")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise SampleError(
                sample_id, f"turn {position} has role {role!r}; valid roles: {', '.join(ROLES)}"
            )
        if not isinstance(value, str):
            raise SampleError(sample_id, f"turn {position} value is {type(value).__name__}, not str")
        turns.append({"from": role, "value": value})
    if not any(turn["from"] == "gpt" for turn in turns):
        raise SampleError(sample_id, "has no 'gpt' turn, so nothing would be trained on")
    first = next(turn for turn in turns if turn["from"] != "system")
    if first["from"] != "human":
        # An answer to no question: chat templates differ on whether they even render it, and
        # LLaVA's loader silently drops such a turn. Refuse it so the data gets fixed.
        raise SampleError(sample_id, "the first turn (after any system turn) is from 'gpt'; it must be from 'human'")
    return turns


def normalize_sample(raw: Mapping[str, Any], index: int, image_token: str = "<image>") -> dict:
    """Canonical form of `raw` (see the module docstring); `index` is its position in the
    source and becomes the id when the record has none. Raises `SampleError` when the sample
    cannot be used. `raw` is not modified."""
    if not isinstance(raw, Mapping):
        raise SampleError(str(index), f"record is {type(raw).__name__}, not a dict")
    raw_id = raw.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise SampleError(str(index), f"'id' is a {type(raw_id).__name__} ({raw_id!r}); expected a string or an integer")
    sample_id = str(raw_id) if raw_id is not None else str(index)
    images = _image_list(raw, sample_id)
    turns = _turns(raw, sample_id)

    markers = sum(turn["value"].count(image_token) for turn in turns)
    if images and markers == 0:
        # LLaVA's data leaves the marker out of some records; its loader puts the image first.
        first_human = next((turn for turn in turns if turn["from"] == "human"), None)
        if first_human is None:
            raise SampleError(sample_id, f"has {len(images)} image(s) but no human turn to hold them")
        first_human["value"] = f"{image_token}\n" * len(images) + first_human["value"]
        markers = len(images)
    if markers != len(images):
        raise SampleError(
            sample_id,
            f"has {markers} {image_token} marker(s) in its turns but {len(images)} image(s); "
            f"put one {image_token} where each image belongs",
        )
    return {"id": sample_id, "images": images, "conversations": turns}
