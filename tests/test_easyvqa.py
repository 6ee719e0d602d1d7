"""The embedded default: easy-VQA preparation (real package data), the experts' labels, and a
miniature end-to-end run of the whole demo pipeline."""
from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from seechat.config import REPO_ROOT
from seechat.experiments.easyvqa.experts import qa_pairs, image_attributes

spec = importlib.util.spec_from_file_location("prepare_easyvqa", REPO_ROOT / "data" / "prepare_easyvqa.py")
prepare_easyvqa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_easyvqa)


@pytest.fixture(scope="module")
def easyvqa(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("easyvqa")
    prepare_easyvqa.prepare(out)
    return out


def _load(root: Path, name: str) -> list[dict]:
    return json.loads((root / name).read_text())


def test_prepared_splits(easyvqa):
    train, val, test = (_load(easyvqa, f) for f in ("train.json", "val.json", "test.json"))
    assert len(train) + len(val) == 38_575
    assert len(test) == 9_673
    train_images, val_images = {s["image"] for s in train}, {s["image"] for s in val}
    assert not train_images & val_images
    assert len(val_images) == int(0.05 * 4000)
    assert all(s["image"].startswith("images/test/") for s in test)
    for s in train[:50] + val[:50] + test[:50]:
        assert (easyvqa / s["image"]).is_file()
    assert _load(easyvqa, "answers.json") == sorted(
        ["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle",
         "brown", "blue", "no"])


def test_multiturn_holds_every_training_question_once(easyvqa):
    train, multi = _load(easyvqa, "train.json"), _load(easyvqa, "train_multiturn.json")
    single = Counter((s["image"], s["conversations"][0]["value"].replace("<image>\n", ""),
                      s["conversations"][1]["value"]) for s in train)
    grouped = Counter(qa_pairs(multi))
    assert grouped == single
    for s in multi:
        turns = s["conversations"]
        assert len(turns) <= 2 * prepare_easyvqa.TURNS_PER_SAMPLE
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1


def test_balanced_file_has_equal_yes_and_no_per_family_and_pass(easyvqa):
    train, balanced = _load(easyvqa, "train.json"), _load(easyvqa, "train_balanced.json")
    what = [s for s in train if prepare_easyvqa.yes_no_family(s) is None]
    assert len(balanced) % 2 == 0
    half = len(balanced) // 2
    train_ids = {s["id"] for s in train}
    for draw in (balanced[:half], balanced[half:]):
        assert {s["id"] for s in draw} <= train_ids  # training questions only, never val/test
        assert sum(prepare_easyvqa.yes_no_family(s) is None for s in draw) == len(what)
        counts = Counter((prepare_easyvqa.yes_no_family(s), s["conversations"][1]["value"])
                         for s in draw if prepare_easyvqa.yes_no_family(s))
        families = {f for f, _ in counts}
        assert families == {"color", "color negated", "shape", "shape negated"}
        assert all(counts[(f, "yes")] == counts[(f, "no")] > 500 for f in families)
    assert [s["id"] for s in balanced[:half]] != [s["id"] for s in balanced[half:]]


def test_attributes_inferred_from_yes_no_agree_with_what_answers(easyvqa):
    pairs = qa_pairs(_load(easyvqa, "train_multiturn.json"))
    direct = {}
    for image, question, answer in pairs:
        if question.startswith("what color"):
            direct.setdefault(image, {})["color"] = answer
    only_yes_no = [p for p in pairs if p[2] in ("yes", "no")]
    inferred = image_attributes(only_yes_no)
    checked = [(img, a["color"]) for img, a in inferred.items() if "color" in a and img in direct]
    assert len(checked) > 40  # elimination needs all other colors answered: not that common
    assert all(direct[img]["color"] == color for img, color in checked)


def test_demo_pipeline_end_to_end_smoke(easyvqa, tmp_path, monkeypatch):
    from seechat.experiments.easyvqa.pipeline import question_type, run_seed, write_report

    monkeypatch.chdir(tmp_path)
    os.makedirs("data/generated")
    os.symlink(easyvqa, "data/generated/easyvqa")
    result = run_seed(
        0, ["train.max_steps=2", "data.max_samples=64", "data.num_workers=0", "train.trackers=[]",
            "train.batch_size=8"],
        fresh=True, eval_samples=24,
        expert_kwargs={"max_train_samples": 40, "vision_epochs": 1, "llm_epochs": 1},
    )
    assert result["test"]["n"] == 24
    assert result["align"]["steps"] == result["finetune"]["steps"] == 2
    rows = [json.loads(x) for x in Path("runs/demo/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["images"][0].startswith("images/test/") for r in rows)
    # The default's final model exports to stock Llava as it is (16 image tokens, no CLS, no pixel
    # shuffle) and answers these test questions there exactly as `seechat eval` did here.
    from default_model import llava_answers
    from seechat.tools.export import export_llava_hf

    exported = export_llava_hf(result["final"], tmp_path / "llava")
    pairs = [(str(Path("data/generated/easyvqa") / r["images"][0]), r["question"]) for r in rows]
    assert llava_answers(exported, pairs)[0] == [r["prediction"] for r in rows]
    # the per-type breakdown counts every evaluated question once
    by_type = {}
    for row in rows:
        by_type.setdefault(question_type(row), []).append(row["correct"])
    assert result["accuracy_by_type"] == {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    assert set(by_type) <= {"color", "shape", "yes/no", "yes/no negated"}
    text = write_report(result, rows[:3])
    assert "Test exact match" in text and Path("runs/demo/report.md").is_file()
    for expert in ("tokenizer", "vision", "llm"):
        assert Path("runs/demo/experts", expert).is_dir()
    # The experts record how they were made; only the same settings reuse them.
    from seechat.experiments.easyvqa.experts import EXPERTS_VERSION
    from seechat.experiments.easyvqa.pipeline import ensure_default_inputs
    from seechat.precision import resolve_mixed_precision

    settings = {"max_train_samples": 40, "vision_epochs": 1, "llm_epochs": 1}
    marker = json.loads(Path("runs/demo/experts/experts.json").read_text())
    assert marker == {"version": EXPERTS_VERSION, "seed": 0, **settings,
                      "mixed_precision": resolve_mixed_precision("auto")}
    assert ensure_default_inputs(**settings) == 0.0
    marker["version"] -= 1  # experts from an older seechat are rebuilt
    Path("runs/demo/experts/experts.json").write_text(json.dumps(marker))
    assert ensure_default_inputs(**settings) > 0.0
    assert json.loads(Path("runs/demo/experts/experts.json").read_text())["version"] == EXPERTS_VERSION


def test_data_prepared_by_an_older_script_is_prepared_again(easyvqa, tmp_path):
    from seechat.experiments.easyvqa.pipeline import prepare_data

    marker = json.loads((easyvqa / "prepared_by.json").read_text())
    assert marker == {"script_sha256": prepare_easyvqa.script_digest(), "seed": 0}
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "prepared_by.json").write_text(json.dumps({"script_sha256": "0" * 64, "seed": 0}))
    (stale / "train_balanced.json").write_text("[]")
    prepare_data(stale)
    assert json.loads((stale / "prepared_by.json").read_text()) == marker
    assert _load(stale, "train_balanced.json") == _load(easyvqa, "train_balanced.json")
