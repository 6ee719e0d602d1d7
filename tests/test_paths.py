"""Paths mean what they say: relative to the recipe file that wrote them, to the current
directory on the command line, and in a saved model relative to the model directory, so a run
tree loads from anywhere and after it is copied elsewhere."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from seechat import load
from seechat.config import RecipeError, load_recipe
from seechat.models.saved import ModelDirError
from seechat.training.loop import run


def _project(experts: dict, tiny_vqa: dict, root: Path) -> Path:
    """root/{experts,data} and root/recipes/tiny.yaml naming them relative to recipes/."""
    shutil.copytree(Path(experts["hf_encoder"]["name"]), root / "experts" / "vision")
    shutil.copytree(experts["qwen2"], root / "experts" / "llm")
    shutil.copytree(tiny_vqa["root"], root / "data")
    (root / "recipes").mkdir()
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "align", "seed": 0, "output_dir": "../runs/tiny",
        "model": {"encoder": {"backend": "hf", "name": "../experts/vision", "pretrained": True},
                  "adapter": {"type": "mlp", "projector": "mlp2x_gelu"},
                  "llm": {"name_or_path": "../experts/llm"}},
        "data": {"train": "../data/train.json", "image_root": "../data", "num_workers": 0},
        "train": {"batch_size": 4, "max_steps": 3, "log_every": 1, "trackers": [], "mixed_precision": "no",
                  "warmup_ratio": 0.0},
    }))
    return recipe


def _answer(model_dir: Path, image: Path) -> str:
    return load(model_dir).chat("What color is the shape?", Image.open(image), max_new_tokens=6)


def test_a_run_tree_loads_from_anywhere_and_after_a_copy(experts, tiny_vqa, tmp_path, monkeypatch):
    recipe = _project(experts, tiny_vqa, tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resolved = load_recipe(recipe)
    assert resolved["model"]["encoder"]["name"] == str(tmp_path / "project" / "experts" / "vision")
    assert resolved["data"]["image_root"] == str(tmp_path / "project" / "data")
    summary = run(resolved)
    final = tmp_path / "project" / "runs" / "tiny" / "final"
    assert Path(summary["final"]) == final and not (tmp_path / "elsewhere" / "runs").exists()
    meta = json.loads((final / "seechat.json").read_text())
    assert meta["model"]["encoder"]["name"] == "../../../experts/vision"
    assert meta["model"]["llm"]["name_or_path"] == "../../../experts/llm"
    image = tmp_path / "project" / "data" / "images" / "0.png"
    before = _answer(final, image)

    shutil.move(tmp_path / "project", tmp_path / "moved")  # the whole tree, elsewhere
    (tmp_path / "unrelated").mkdir()
    monkeypatch.chdir(tmp_path / "unrelated")
    moved = tmp_path / "moved" / "runs" / "tiny" / "final"
    assert _answer(moved, tmp_path / "moved" / "data" / "images" / "0.png") == before
    assert load(moved).config["encoder"]["name"] == str(tmp_path / "moved" / "experts" / "vision")

    shutil.rmtree(tmp_path / "moved" / "experts" / "vision")
    message = (f"{moved / 'seechat.json'}: model.encoder.name='../../../experts/vision' (relative to the model "
               f"directory {moved}): no such file or directory: {tmp_path / 'moved' / 'experts' / 'vision'}")
    with pytest.raises(ModelDirError, match=re.escape(message)):
        load(moved)


def test_missing_hub_and_command_line_paths(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("model:\n  encoder: {backend: hf, name: ../experts/vision}\n  llm: {name_or_path: org/model}\n")
    with pytest.raises(RecipeError, match=re.escape(
            f"model.encoder.name='../experts/vision': no such file or directory: {tmp_path / 'experts' / 'vision'} "
            f"(relative to {tmp_path / 'recipes'} (the directory of {recipe}))")):
        load_recipe(recipe)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(RecipeError, match=re.escape(
            f"model.encoder.name='vision/x/y': no such file or directory: {tmp_path / 'cwd' / 'vision/x/y'} "
            f"(relative to {tmp_path / 'cwd'} (the current directory))")):
        load_recipe(recipe, ["encoder.name=vision/x/y"])
    r = load_recipe(recipe, ["encoder.name=openai/clip-vit-base-patch32", "data.train=d.json", "output_dir=out"])
    assert r["model"]["encoder"]["name"] == "openai/clip-vit-base-patch32"  # Hub-shaped, not here: a Hub id
    assert r["model"]["llm"]["name_or_path"] == "org/model"
    assert (r["data"]["train"], r["output_dir"]) == (str(tmp_path / "cwd" / "d.json"), str(tmp_path / "cwd" / "out"))
    (tmp_path / "recipes" / "org" / "model").mkdir(parents=True)  # now it exists beside the recipe: a path
    assert load_recipe(recipe, ["encoder.name=openai/x"])["model"]["llm"]["name_or_path"] == \
        str(tmp_path / "recipes" / "org" / "model")


def test_inherit_a_packaged_recipe_and_a_card_file(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "card.yaml").write_text("type: qformer\nnum_queries: 4\n")
    child = tmp_path / "mine" / "r.yaml"
    child.write_text("inherit: llava15_align.yaml\nmodel:\n  adapter: {card: card.yaml, num_layers: 2}\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(child)  # llava15_align.yaml is not beside r.yaml: the packaged one
    assert r["model"]["llm"]["name_or_path"] == "lmsys/vicuna-7b-v1.5"
    assert r["model"]["adapter"]["type"] == "qformer" and r["model"]["adapter"]["num_queries"] == 4
    # a packaged recipe stands for ./recipes/<name>: its ../runs is ./runs of the cwd
    assert r["output_dir"] == str(tmp_path / "runs" / "llava15_align")
    child.write_text("inherit: nope.yaml\n")
    with pytest.raises(RecipeError, match=r"inherit: nope.yaml names neither a file beside it .* nor a packaged "
                                          r"recipe \(packaged: .*easyvqa_align.yaml"):
        load_recipe(child)
    with pytest.raises(RecipeError, match=re.escape(
            f"adapter card file 'cards/none.yaml' does not exist: {tmp_path / 'cards' / 'none.yaml'} "
            f"(relative to {tmp_path} (the current directory))")):
        load_recipe(None, ["adapter=cards/none.yaml"])
