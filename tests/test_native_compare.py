"""`seechat compare --quick` end to end on tiny experts and a tiny easy-VQA-shaped set: every path
(three stitched, native grown from the text LM, native from scratch) trains, is scored, and the
native drawings and the VQ reconstructions are judged; the result files hold the table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionModel

from seechat.cli import main
from seechat.experiments.easyvqa.experts import COLORS, SHAPES
from seechat.experiments.tiny import tiny_clip_vision_config

RGB = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "black": (10, 10, 10),
       "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (140, 80, 20), "yellow": (230, 220, 30)}


def easyvqa_like(root: Path) -> None:
    """Every (color, shape) once for training and a few for the test; 'what color/shape' questions."""
    (root / "images").mkdir(parents=True)
    split = {"train": [], "test": []}
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        image = Image.new("RGB", (32, 32), "white")
        box = [6 + i % 4, 6, 24, 24 - i % 3]
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=RGB[color])
        elif shape == "rectangle":
            draw.rectangle(box, fill=RGB[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=RGB[color])
        image.save(root / "images" / f"{i}.png")
        for part in ("train", "test") if i % 3 == 0 else ("train",):
            split[part].append({"id": f"{part}{i}", "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": color},
                {"from": "human", "value": "what shape is in the image?"}, {"from": "gpt", "value": shape}]})

    def single(samples):  # one question per sample, as train_balanced.json / test.json hold them
        return [{"id": f"{s['id']}-{k}", "image": s["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + s["conversations"][2 * k]["value"].replace("<image>\n", "")},
            s["conversations"][2 * k + 1]]} for s in samples for k in (0, 1)]

    (root / "train_multiturn.json").write_text(json.dumps(split["train"]))
    (root / "train_balanced.json").write_text(json.dumps(single(split["train"])))
    (root / "val.json").write_text(json.dumps(single(split["test"])[:4]))
    (root / "test.json").write_text(json.dumps(single(split["test"])))


@pytest.mark.slow
def test_compare_quick_runs_every_path_and_writes_the_table(experts, tmp_path, capsys):
    torch.manual_seed(0)
    kit = tmp_path / "experts"
    kit.mkdir()
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(kit / "vision")
    (kit / "tokenizer").symlink_to(experts["tokenizer"])
    (kit / "llm").symlink_to(experts["qwen2"])
    easyvqa_like(tmp_path / "data")
    out = tmp_path / "compare"
    assert main(["compare", "--quick", f"experts={kit}", f"data_dir={tmp_path / 'data'}", f"output_dir={out}",
                 f"results_dir={out}", "native.vq_config={channels: 8, downsample: 2, levels: [5, 5, 5], semantic_tokens: 2}",
                 "native.vq_config.image_size=16", "generation.reconstructions=4"]) == 0
    results = json.loads((out / "compare.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["mlp", "qformer", "resampler", "native", "native_stats", "native_scratch"]
    assert [(r["path"], r["seed"]) for r in results["runs"]] == [(p, 0) for p in rows]
    assert all(r["n"] == 16 and r["accuracy"]["values"] == [r["accuracy"]["mean"]] for r in rows.values())
    grown = "vision tower (2 semantic codes) + text LM, vocabulary grown by the VQ codes"
    assert rows["native_stats"]["starts_from"] == grown
    assert rows["native"]["starts_from"] == grown + ", code rows toward their words"
    assert rows["native_scratch"]["starts_from"] == "vision tower (2 semantic codes); LM from scratch (VQ codes + text)"
    # 2 semantic codes + the 4x4 grid + <im_start>/<im_end>
    assert rows["native"]["image_tokens"] == rows["native_scratch"]["image_tokens"] == 2 + 4 * 4 + 2
    # mlp inherits the default's one token per patch (no pixel shuffle, the CLS dropped): 4x4
    assert rows["mlp"]["image_tokens"] == 4 * 4 and rows["qformer"]["image_tokens"] == 16
    # the grown native LM has the text LM's width; the one from scratch the recipe's llm.config
    grown, scratch = (json.loads((Path(results["runs"][i]["final"]) / "llm" / "config.json").read_text())
                      for i in (3, 5))
    assert grown["hidden_size"] == 64 and grown["model_type"] == "qwen2"
    assert scratch["hidden_size"] == 192 and scratch["model_type"] == "qwen3"
    for name in ("native", "native_stats", "native_scratch"):
        drawn = rows[name]["drawn"]
        assert set(drawn) == {"color", "shape", "both"} and 0 <= drawn["both"]["mean"] <= 1
        assert len(list((out / "seed0" / name / "drawn").glob("*.png"))) == 24
    assert results["vq_judged"]["reconstructions"]["images"] == 4
    assert results["native_mix"] == {"vqa": 48, "draw": 2 * 24, "image_only": 0}
    table = (out / "compare.md").read_text()
    assert table in capsys.readouterr().out and "| native_scratch (none (early fusion)) | vision tower" in table
    with Image.open(out / "compare.png") as image:
        assert image.size[0] > 300


def test_vq_sweep_table_with_the_pixel_judge(tmp_path):
    from seechat.experiments.vq_sweep import sweep, table

    easyvqa_like(tmp_path / "data")
    rows = sweep(tmp_path / "data", tmp_path / "sweep", ["8x8-1000", "16x16-1000"], epochs=1, max_seconds=20,
                 judged_images=8, pixel_judge=True)
    assert [(r["codes_per_image"], r["codebook_size"]) for r in rows.values()] == [(64, 1000), (256, 1000)]
    for r in rows.values():
        assert r["pixel_judged"]["images"] == r["pixel_judged_originals"]["images"] == 8
        assert 0 <= r["pixel_judged"]["both"] <= min(r["pixel_judged"]["color"], r["pixel_judged"]["shape"]) <= 1
    text = table(rows)
    assert text.splitlines()[2].startswith("| 8x8-1000 | 64 | 1000 | 638 |")  # 64 x log2(1000) bits
    assert "| 16x16-1000 | 256 | 1000 | 2551 |" in text and "(pixel judge: " in text
    assert (tmp_path / "sweep" / "vq_sweep.md").read_text() == text
    again = sweep(tmp_path / "data", tmp_path / "sweep", ["8x8-1000"], epochs=1)  # trained tokenizers are reused
    assert again["8x8-1000"]["train_seconds"] == rows["8x8-1000"]["train_seconds"]


def test_grouped_questions_keep_every_balanced_draw_and_read_each_image_once_per_conversation():
    from collections import Counter

    from seechat.experiments.easyvqa.prepare import balanced, yes_no_family
    from seechat.experiments.native_prepare import grouped_questions

    def q(i, image, question, answer):
        return {"id": f"t{i}", "image": f"images/{image}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}

    single = [q(i, i % 5, *pair) for i, pair in enumerate(
        [("what shape is in the image?", "circle"), ("is there a red shape?", "no"),
         ("is there a red shape?", "yes"), ("is there a blue shape?", "no"), ("what color is the shape?", "red")] * 7)]
    grouped = grouped_questions(single, turns=3, seed=4, passes=2)
    assert len({s["id"] for s in grouped}) == len(grouped)
    pairs = Counter()
    for s in grouped:
        turns = s["conversations"]
        assert 1 <= len(turns) // 2 <= 3 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in turns[1:])
        pairs.update((s["image"], t["value"].replace("<image>\n", ""), a["value"]) for t, a in zip(turns[::2], turns[1::2]))
    # exactly the questions of two balanced draws, each yes/no family with as many yes as no
    drawn = Counter((s["image"], s["conversations"][0]["value"].replace("<image>\n", ""), s["conversations"][1]["value"])
                    for p in range(2) for s in balanced(single, 4 + p, passes=1))
    assert pairs == drawn
    families = Counter((yes_no_family(q(0, 0, k[1], k[2])), k[2]) for k in pairs.elements())
    assert families[("color", "yes")] == families[("color", "no")] > 0


def test_native_prepare_reads_the_semantic_codes_off_the_given_tower(tmp_path):
    from seechat.experiments.native_prepare import prepare_native
    from seechat.models.native.vq import VQTokenizer

    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(tmp_path / "vision")
    easyvqa_like(tmp_path / "data")
    config = {"channels": 8, "downsample": 2, "levels": [5, 5, 5], "image_size": 16, "semantic_tokens": 2}
    out = prepare_native(tmp_path / "data", tmp_path / "out", vq_epochs=1, vq_config=config,
                         semantic_tower=tmp_path / "vision")
    vq = VQTokenizer.from_pretrained(out["vq"])
    assert vq.num_codes == 2 + 4 * 4 and vq.codebook_size == 125 * 3
    assert vq.config["semantic_encoder"]["backend"] == "hf" and vq.config["semantic_encoder"]["arch"] == "clip"
    assert out["vq_metrics"]["settings"]["semantic_tower"] == str(tmp_path / "vision")
    # code_words.json: a weight row per code (colour words, then shape words), each seen row sums to 1
    words = vq.code_words
    assert words["words"] == sorted(COLORS) + sorted(SHAPES) and len(words["weights"]) == 375
    assert all(abs(sum(row) - 1) < 1e-3 or sum(row) == 0 for row in words["weights"])
    with pytest.raises(ValueError, match=r"semantic_tokens=2 needs semantic_tower: the directory of a pretrained"):
        prepare_native(tmp_path / "data", tmp_path / "out2", vq_epochs=1, vq_config=config)


def test_native_prepare_cli_names_the_missing_tower(capsys):
    from seechat.experiments.native_prepare import main as prepare_main

    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--semantic-tokens", "2"])
    assert exit_info.value.code == 2
    assert "--semantic-tokens 2 needs --semantic-tower DIR" in capsys.readouterr().err
