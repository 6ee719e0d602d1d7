"""Your own data end to end: `seechat data check` on a clean and a broken file, `seechat experts`
on a few dozen samples (loadable experts, a recipe that trains), `seechat eval`'s breakdown and
its --image-root default, `--compare`, and recipes/own_data_example.yaml."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer, CLIPVisionModel

from conftest import tiny_recipe
from seechat.cli import main
from seechat.config import load_recipe
from seechat.inference.breakdown import breakdown, format_comparison, question_group, variable_words
from seechat.training.data_check import check_data

FAST = ["train.mixed_precision=no", "data.num_workers=0"]


def _recipe_file(experts, data, tmp_path, name="r") -> Path:
    recipe = tiny_recipe(experts, data, str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_data_check_on_a_clean_file(experts, tiny_vqa, tmp_path, capsys):
    path = _recipe_file(experts, tiny_vqa, tmp_path)
    report = check_data(load_recipe(path))
    # 24 one-image questions, one two-image sample, one text-only sample
    assert (report["samples"], report["kept"], report["images"], report["text_only"]) == (26, 26, 26, 1)
    assert report["skipped"] == {} and report["problems"] == [] and report["truncated"] == 0
    assert report["image_sizes"]["commonest"] == [("32x32", 26)]
    # "red<|im_end|>": the answer and the end-of-turn token; the two-turn sample has more
    assert report["supervised_tokens"]["min"] >= 2 and report["supervised_tokens"]["max"] > report["supervised_tokens"]["min"]
    assert "[[" in report["rendered_sample"] and f"<image>x{report['image_tokens_per_image']}" in report["rendered_sample"]
    assert main(["data", "check", "--config", str(path)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_data_check_on_a_broken_file(experts, tiny_vqa, tmp_path, capsys):
    records = json.loads(Path(tiny_vqa["train"]).read_text())[:6]
    records[1]["image"] = "images/missing.png"
    records[2]["conversations"] = records[2]["conversations"][:1]  # a question, no answer: nothing supervised
    lines = [json.dumps(r) for r in records] + ["{not json"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    data = {**tiny_vqa, "train": str(broken)}
    path = _recipe_file(experts, data, tmp_path)
    report = check_data(load_recipe(path))
    assert report["samples"] == 6 and report["kept"] == 4 and report["broken_lines"] == 1
    assert report["skipped"] == {"image missing": 1, "no supervised token": 1}
    assert len(report["problems"]) == 3
    assert main(["data", "check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS (3)" in out and "image missing" in out and f"{broken}:7" in out


def test_question_groups_and_confusions():
    rows = [
        {"question": "Is there a red shape?", "answer": "yes", "prediction": "yes", "correct": True},
        {"question": "is there a blue shape", "answer": "no", "prediction": "yes", "correct": False},
        {"question": "What color is it?", "answer": "red", "prediction": "blue", "correct": False},
        {"question": "What color is it?", "answer": "blue", "prediction": "blue", "correct": True},
        {"question": "What color is it?", "answer": "red", "prediction": "blue", "correct": False},
    ]
    assert variable_words(r["answer"] for r in rows) == {"red", "blue"}
    assert question_group("Is there a red shape? 3", {"red"}) == "is there a _ shape #"
    result = breakdown(rows)
    assert result["grouped_by"] == "question"
    assert result["by_group"] == {"what color is it": {"n": 3, "correct": 1, "accuracy": 1 / 3},
                                  "is there a _ shape": {"n": 2, "correct": 1, "accuracy": 0.5}}
    assert result["confusions"] == [{"answer": "red", "prediction": "blue", "count": 2},
                                    {"answer": "no", "prediction": "yes", "count": 1}]
    typed = breakdown([{**r, "type": "color" if "color" in r["question"] else "yes/no"} for r in rows])
    assert typed["grouped_by"] == "type" and list(typed["by_group"]) == ["color", "yes/no"]
    a = {"accuracy": 0.5, "correct": 1, "n": 2, "breakdown": {"by_group": {"g": {"accuracy": 0.5, "correct": 1, "n": 2}}}}
    b = {"accuracy": 1.0, "correct": 2, "n": 2, "breakdown": {"by_group": {"g": {"accuracy": 1.0, "correct": 2, "n": 2}}}}
    lines = format_comparison(a, b).splitlines()
    assert lines[1].split() == ["overall", "50.00%", "(1/2)", "100.00%", "(2/2)", "+50.00"]
    assert lines[2].split() == ["g", "50.00%", "(1/2)", "100.00%", "(2/2)", "+50.00"]


@pytest.fixture(scope="module")
def own_experts(tiny_vqa, tmp_path_factory):
    """`seechat experts` on the tiny set (26 samples) into a fresh directory, at the tiny preset."""
    out = tmp_path_factory.mktemp("own") / "experts"
    assert main(["experts", "--data", tiny_vqa["train"], "--out", str(out), "--size", "tiny",
                 "--vision-epochs", "2", "--llm-epochs", "2", "--test", tiny_vqa["test"]]) == 0
    return out


def test_experts_are_loadable_and_their_recipe_trains(own_experts, tiny_vqa, capsys):
    info = json.loads((own_experts / "experts.json").read_text())
    assert info["describing_questions"] == {"what color is the shape": 3}
    assert info["vision"] == {"image_size": 32, "patch_size": 8, "epochs": 2, "objective": "contrastive"}
    assert (info["samples"], info["pairs"], info["images"]) == (26, 27, 24)
    tower = CLIPVisionModel.from_pretrained(own_experts / "vision")
    assert tower.config.image_size == 32 and tower.config.hidden_size == 64
    tokenizer = AutoTokenizer.from_pretrained(own_experts / "llm")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    align = json.loads(json.dumps(yaml.safe_load((own_experts / "align.yaml").read_text())))
    assert align["data"]["train"] == str(Path("..") / Path(tiny_vqa["train"]).relative_to(Path(tiny_vqa["root"]).parent).as_posix()) \
        or Path(own_experts / align["data"]["train"]).resolve() == Path(tiny_vqa["train"]).resolve()
    # the 4x4 patch grid folds into one token: CLS + 1 image token
    assert align["model"]["adapter"] == {"card": "mlp2x_gelu", "pixel_shuffle": 4}
    for stage in ("align", "finetune"):
        assert main(["train", "--config", str(own_experts / f"{stage}.yaml"), "train.max_steps=2", *FAST]) == 0
        assert (own_experts / "runs" / stage / "final" / "seechat.json").is_file()


def test_eval_breakdown_and_image_root_default(own_experts, tiny_vqa, tmp_path, capsys):
    final = own_experts / "runs" / "finetune" / "final"
    if not final.is_dir():  # run alone: train it first
        for stage in ("align", "finetune"):
            assert main(["train", "--config", str(own_experts / f"{stage}.yaml"), "train.max_steps=2", *FAST]) == 0
    capsys.readouterr()
    # test.json's images are relative to its own directory: no --image-root needed
    assert main(["eval", "--model", str(final), "--data", tiny_vqa["test"], "--output-dir", str(tmp_path / "a"),
                 "--batch-size", "8", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n"] == 24 and list(summary["breakdown"]["by_group"]) == ["what color is the shape"]
    assert summary["breakdown"]["by_group"]["what color is the shape"]["n"] == 24
    wrong = 24 - summary["correct"]
    assert sum(c["count"] for c in summary["breakdown"]["confusions"]) == wrong
    assert "what color is the shape" in out
    rows = [json.loads(x) for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"answer", "prediction", "correct"} <= set(rows[0])
    # a wrong root is named by its flag
    assert main(["eval", "--model", str(final), "--data", tiny_vqa["test"], "--image-root", str(tmp_path),
                 "--output-dir", str(tmp_path / "b")]) == 2
    assert f"--image-root {tmp_path}" in capsys.readouterr().err
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "c" / "summary.json")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "+0.00"
    assert main(["eval", "--data", tiny_vqa["test"]]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_own_data_example_recipe_trains(own_experts, tiny_vqa, tmp_path):
    """recipes/own_data_example.yaml beside `experts/` and `mine/`, as its comment says."""
    shutil.copy(Path(__file__).parents[1] / "recipes" / "own_data_example.yaml", tmp_path)
    shutil.copytree(own_experts, tmp_path / "experts", ignore=shutil.ignore_patterns("runs"))
    shutil.copytree(tiny_vqa["root"], tmp_path / "mine")
    recipe = load_recipe(tmp_path / "own_data_example.yaml", ["train.max_steps=2", *FAST])
    assert recipe["model"]["encoder"]["name"] == str(tmp_path / "experts" / "vision")
    assert recipe["data"]["val"] is None and recipe["data"]["image_root"] == str(tmp_path / "mine")
    assert main(["train", "--config", str(tmp_path / "own_data_example.yaml"), "train.max_steps=2", *FAST]) == 0
    assert (tmp_path / "runs" / "mine_align" / "final" / "seechat.json").is_file()
