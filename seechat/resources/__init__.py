"""Files shipped inside the package: the adapter cards and the base recipes.

`adapters/*.yaml` and `recipes/*.yaml` here are byte-for-byte copies of the checkout's top-level
`adapters/` and `recipes/` (the copies users read and edit; `make sync-resources` copies them
here, and tests/test_wheel.py fails when the two differ). Lookups go through these copies, so
an installed wheel finds its cards and recipes from any working directory.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# seechat is installed as plain files (wheel or editable), so the traversable is a real path.
ROOT = Path(str(files(__name__)))
CARDS = ROOT / "adapters"
RECIPES = ROOT / "recipes"


def card_names() -> list[str]:
    """Names of the packaged adapter cards (`model.adapter: <name>`)."""
    return sorted(p.stem for p in CARDS.glob("*.yaml"))


def card_file(name: str) -> Path | None:
    """The packaged card `name` (e.g. "qformer"), or None when there is none by that name."""
    path = CARDS / f"{name}.yaml"
    return path if path.is_file() and path.parent == CARDS else None


def recipe_names() -> list[str]:
    return sorted(p.name for p in RECIPES.glob("*.yaml"))


def recipe_file(name: str) -> Path:
    """The packaged base recipe `name` (e.g. "easyvqa_align.yaml")."""
    path = RECIPES / name
    if not path.is_file():
        raise FileNotFoundError(f"no packaged recipe {name!r}; packaged: {', '.join(recipe_names())}")
    return path


def is_packaged_recipe(path: Path) -> bool:
    """Whether `path` is one of the packaged recipes (their relative paths resolve differently:
    see seechat/recipe_paths.py)."""
    return path.resolve().parent == RECIPES.resolve()
