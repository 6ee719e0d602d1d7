"""`from_pretrained` with seechat's two rules for expert weights: remote code runs only when
the recipe says so, and a name that cannot be loaded is reported with the recipe key that
holds it, instead of as a Hub connection error about a file the user never named."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def looks_like_path(name: str) -> bool:
    """Absolute, home- or dot-relative names are local paths; "org/model" may be a Hub id."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def from_pretrained(
    loader: Callable[..., T], name: str, key: str, trust_remote_code: bool = False, **kwargs: Any
) -> T:
    """`loader(name, trust_remote_code=..., **kwargs)`; `key` is the recipe key that named
    `name` (e.g. "model.llm.name_or_path") and appears in every error."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise ValueError(f"{key}={name!r}: no such file or directory")
    try:
        return loader(name, trust_remote_code=bool(trust_remote_code), **kwargs)
    except OSError as err:
        raise ValueError(
            f"{key}={name!r} cannot be loaded: neither a local model directory nor a Hub id that "
            f"could be fetched (offline?). Underlying error: {err}"
        ) from err
