"""The package ships its adapter cards and base recipes, identical to the checkout's copies, and
a wheel installed apart from the checkout finds them from any working directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from seechat.config import REPO_ROOT

PACKAGED = REPO_ROOT / "seechat" / "resources"


@pytest.mark.parametrize("folder", ["adapters", "recipes"])
def test_packaged_copies_match_the_checkout(folder):
    top = {p.name: p.read_bytes() for p in (REPO_ROOT / folder).glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in (PACKAGED / folder).glob("*.yaml")}
    fix = (f"seechat/resources/{folder}/ must be a byte-for-byte copy of {folder}/*.yaml (the copy users "
           f"edit); run `make sync-resources` and commit both")
    assert sorted(packaged) == sorted(top), fix
    differ = sorted(name for name in top if top[name] != packaged[name])
    assert not differ, f"{', '.join(differ)} differ: {fix}"


def _build_and_install(tmp_path: Path) -> Path:
    """The wheel built from a copy of the sources (the checkout is left untouched), installed
    with pip into a bare target directory."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "seechat", src / "seechat", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # --no-build-isolation: build with this environment's setuptools (no index needed).
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, cwd=src)
    (wheel,) = (tmp_path / "dist").glob("seechat-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


@pytest.mark.slow
def test_wheel_finds_its_cards_and_recipes_outside_the_checkout(experts, tiny_vqa, tmp_path):
    target = _build_and_install(tmp_path)
    assert sorted(p.name for p in (target / "seechat" / "resources" / "adapters").glob("*.yaml")) == \
        sorted(p.name for p in (REPO_ROOT / "adapters").glob("*.yaml"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    # -S: no site processing, so the checkout's editable install (a .pth finder) is not active;
    # the dependencies come from this environment's site-packages, after the installed wheel.
    site = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), site]), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def python(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-S", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    probe = "import json, sys, seechat; print(json.dumps([seechat.__file__, sys.path, list(map(repr, sys.meta_path))]))"
    module, path, finders = json.loads(python("-c", probe))
    assert Path(module).is_relative_to(target)
    # The checkout is not on sys.path, and no entry but the target holds a seechat package (this
    # environment's site-packages lies inside the checkout: .venv), nor is the editable finder on.
    assert all(Path(p or work).resolve() != REPO_ROOT for p in path), path
    assert [p for p in path if (Path(p or work) / "seechat").exists()] == [str(target)], path
    assert not [f for f in finders if "editable" in f], finders

    # a card by name and a base recipe by name, neither beside this recipe
    (work / "r.yaml").write_text("inherit: llava15_align.yaml\nmodel:\n  adapter: qformer\n")
    out = python("-m", "seechat.cli", "estimate", "--config", "r.yaml")
    assert "adapter qformer" in out and "built-in table (lmsys/vicuna-7b-v1.5" in out

    (work / "train.yaml").write_text(yaml.safe_dump({
        "stage": "align", "output_dir": "run",
        "model": {"encoder": experts["hf_encoder"],
                  "adapter": {"card": "qformer", "num_queries": 8, "hidden_size": 32, "num_layers": 2,
                              "num_heads": 2, "intermediate_size": 64},
                  "llm": {"name_or_path": experts["qwen2"]}},
        "data": {"train": tiny_vqa["train"], "image_root": tiny_vqa["root"], "num_workers": 0},
        "train": {"batch_size": 4, "max_steps": 2, "log_every": 1, "trackers": [], "mixed_precision": "no",
                  "warmup_ratio": 0.0},
    }))
    summary = json.loads(python("-m", "seechat.cli", "train", "--config", "train.yaml").strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["final"]) == work / "run" / "final"
    meta = json.loads((work / "run" / "final" / "seechat.json").read_text())
    assert meta["model"]["adapter"]["type"] == "qformer" and meta["model"]["adapter"]["num_queries"] == 8
