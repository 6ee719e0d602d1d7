"""What a path in a recipe means: relative to the file that wrote it, or to where you ran.

- A relative path in a recipe FILE resolves against that file's directory (as `inherit:` does),
  so a recipe means the same from any working directory. A value from an inherited recipe
  resolves against the inherited file's directory.
- A value given on the command line (`key=value`) resolves against the current directory.
- The packaged base recipes (seechat/resources/recipes, copies of the checkout's `recipes/`)
  stand for `./recipes/<name>` of the project you run from: their relative paths resolve
  against `<current directory>/recipes`, which is exactly where they lie in a checkout.
- Keys that may name a Hub model (`model.encoder.name`, `model.encoder.pretrained`,
  `model.llm.name_or_path`, `model.llm.tokenizer`; `data.train/val/test` with `data.format: hf`):
  a Hub-shaped value (`name` or `owner/name`, not starting with `.`, `/` or `~`) that does not
  exist locally stays a Hub id; any other value is a local path, and one that does not exist
  is a `RecipeError` naming the key, the value and the directory it was resolved against.
- Pure path keys (`output_dir`, `model.init_from`, `model.native.vq`, `data.image_root`, a
  `data.feature_cache` directory; `data.*` in the llava format) become absolute paths; they may
  name what an earlier stage will write, so they are not required to exist yet.

The resolved recipe (saved in every run directory) holds absolute paths and Hub ids only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from seechat.errors import RecipeError

# dotted key -> "name" (Hub id or local path), "path" (local), "data" (path, or a Hub dataset
# with data.format: hf), "cache" (off | auto | a directory)
PATH_KEYS: dict[tuple[str, ...], str] = {
    ("output_dir",): "path",
    ("model", "init_from"): "path",
    ("model", "encoder", "name"): "name",
    ("model", "encoder", "pretrained"): "name",
    ("model", "llm", "name_or_path"): "name",
    ("model", "llm", "tokenizer"): "name",
    ("model", "native", "vq"): "path",
    ("model", "native", "init_from"): "name",
    ("data", "train"): "data",
    ("data", "val"): "data",
    ("data", "test"): "data",
    ("data", "image_root"): "path",
    ("data", "feature_cache"): "cache",
}
CARD_KEYS = (("model", "adapter"), ("model", "adapter", "card"))
COMMAND_LINE = "the command line"


class Given(str):
    """A path-valued string as written, with the directory it resolves against and where it
    was written (a recipe file or the command line). Lives only while a recipe is loaded."""

    base: Path
    source: str

    def __new__(cls, value: str, base: Path, source: str) -> "Given":
        obj = super().__new__(cls, value)
        obj.base, obj.source = base, source
        return obj

    def __deepcopy__(self, memo: dict) -> "Given":
        return self  # immutable

    def __reduce__(self):
        return Given, (str(self), self.base, self.source)

    def where(self) -> str:
        what = "the current directory" if self.source == COMMAND_LINE else f"the directory of {self.source}"
        return f"relative to {self.base} ({what})"


def hub_shaped(value: str) -> bool:
    """`name` or `owner/name` not starting with `.`, `/` or `~`: may be a Hub id."""
    return not value.startswith((".", "/", "~")) and value.count("/") <= 1 and "\\" not in value


def looks_like_card_file(value: str) -> bool:
    """A card named by file (`my_card.yaml`, `cards/x.yaml`) rather than by packaged name."""
    return value.endswith((".yaml", ".yml")) or value.startswith((".", "/", "~")) or "/" in value


def local_path(value: str, base: Path) -> Path:
    """`value` against `base`, absolute and normalised (`..` collapsed, symlinks kept)."""
    return Path(os.path.abspath(base / Path(value).expanduser()))


def mark(recipe: dict, base: Path, source: str, under: tuple[str, ...] = ()) -> None:
    """Wrap every path-valued string in `recipe` (at or below the dotted key `under`) in a
    `Given` that remembers `base` and `source`."""
    for key in (*PATH_KEYS, *CARD_KEYS):
        if key[: len(under)] != under[: len(key)]:
            continue
        parent = _node(recipe, key[:-1])
        if not isinstance(parent, dict):
            continue
        value = parent.get(key[-1])
        if isinstance(value, str) and not isinstance(value, Given):
            if key in CARD_KEYS and not looks_like_card_file(value):
                continue  # a packaged card's name
            parent[key[-1]] = Given(value, base, source)


def _node(recipe: dict, key: tuple[str, ...]) -> Any:
    node: Any = recipe
    for part in key:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def resolve(recipe: dict) -> None:
    """Replace each `Given` in the merged recipe by an absolute path or a Hub id (module doc)."""
    for key, kind in PATH_KEYS.items():
        parent = _node(recipe, key[:-1])
        value = parent.get(key[-1]) if isinstance(parent, dict) else None
        if not isinstance(value, Given):
            continue
        if kind == "data":
            kind = "name" if recipe.get("data", {}).get("format") == "hf" else "path"
        if kind == "cache" and value in ("off", "auto"):
            parent[key[-1]] = str(value)
            continue
        path = local_path(value, value.base)
        if kind == "name" and hub_shaped(value) and not path.exists():
            parent[key[-1]] = str(value)  # a Hub id (or an open_clip model / tag name)
            continue
        if kind == "name" and not path.exists():
            raise RecipeError(f"{'.'.join(key)}={str(value)!r}: no such file or directory: {path} "
                              f"({value.where()})")
        parent[key[-1]] = str(path)


def card_path(value: str) -> Path:
    """The file of an adapter card named by path (see `looks_like_card_file`)."""
    base = value.base if isinstance(value, Given) else Path.cwd()
    return local_path(value, base)


def missing_card(value: str) -> str:
    where = value.where() if isinstance(value, Given) else "relative to the current directory"
    return f"adapter card file {str(value)!r} does not exist: {card_path(value)} ({where})"
