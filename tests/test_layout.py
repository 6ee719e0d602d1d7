"""The house's rules, checked on the source: imports go one way (downward through the rooms), no
import circle anywhere (lazy imports inside functions count too), library code never imports the
experiments, and only the kinds registry names a model kind."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seechat"

# Lower rooms never import higher ones. `seechat/__init__.py` (the lazy facade) and cli.py (the top)
# may import anything.
ROOMS = ["errors", "precision", "resources", "data", "models", "recipe_paths", "config", "training", "inference", "tools", "experiments", "cli"]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every seechat module `name` imports (top-level and inside functions)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in mods:
                c = c.rpartition(".")[0]
            if c.startswith("seechat") and c != name and c != "seechat":
                out.add(c)
    return out


def _room(module: str) -> int:
    return ROOMS.index(module.split(".")[1])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, f, mods) for m, f in mods.items()}


def test_imports_go_downward(graph):
    upward = [f"{m} -> {t}" for m, targets in graph.items() if m not in ("seechat", "seechat.cli")
              for t in targets if _room(t) > _room(m)]
    assert upward == []


def test_no_import_circle(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_rooms_are_small():
    big = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
           if (n := len(f.read_text().splitlines())) > 400}
    assert big == {}


def test_only_the_kinds_registry_names_a_kind():
    """`== "native"`-style branches belong in seechat/models/kinds.py: the library asks the model's
    parts or its kind's row. (The experiments - `seechat compare` pits the kinds against each other and
    prepares each kind's inputs - are what is built on the library, not part of it.)"""
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?["'](native|stitched)["']|["'](native|stitched)["']\s*(==|!=)""")
    library = [f for f in PACKAGE.rglob("*.py") if f.name != "kinds.py" and "experiments" not in f.parts]
    hits = [f"{f.relative_to(PACKAGE)}:{i}" for f in library
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
