"""data/prepare_llava.py drops and lists exactly the records training would choke on."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from seechat.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("prepare_llava", REPO_ROOT / "data" / "prepare_llava.py")
prepare_llava = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_llava)


def test_clean_keeps_good_and_lists_bad(tiny_vqa, tmp_path):
    samples = json.loads(Path(tiny_vqa["train"]).read_text())
    samples.append({"id": "missing-file", "image": "images/nope.png",
                    "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]})
    samples.append({"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]})
    src = tmp_path / "mix.json"
    src.write_text(json.dumps(samples))
    stats = prepare_llava.clean(src, Path(tiny_vqa["root"]), tmp_path / "mix.clean.json")
    kept = json.loads((tmp_path / "mix.clean.json").read_text())
    assert stats["kept"] == len(kept) == len(samples) - 2
    assert stats["text_only"] == 1 and stats["images"] == 24 + 2
    skipped = [json.loads(x) for x in (tmp_path / "mix.clean.skipped.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == {"missing-file", "no-answer"}
    assert "nope.png" in next(s["reason"] for s in skipped if s["id"] == "missing-file")
