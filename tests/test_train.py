"""The training loop: losses fall, kill-and-resume equals an uninterrupted run, bad samples are
skipped and counted or named, recipes inherit/override/validate, evaluation scores answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from seechat import load
from seechat.config import RecipeError, load_recipe
from seechat.data import SampleError
from seechat.inference.evaluate import evaluate_file, normalize_answer
from seechat.training.loop import run


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def test_finetune_loss_falls(experts, tiny_vqa, tmp_path):
    out = tmp_path / "run"
    run(tiny_recipe(experts, tiny_vqa, str(out), "stage=finetune", "train.max_steps=40", "train.lr=1e-2"))
    curve = losses(out)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5, curve
    assert (out / "recipe.yaml").is_file()
    assert load_recipe(out / "recipe.yaml")["train"]["max_steps"] == 40


def test_kill_and_resume_matches_uninterrupted_run(experts, tiny_vqa, tmp_path):
    common = ["train.max_steps=8", "train.save_every=3", "train.grad_accum=2", "train.batch_size=3",
              "llm.mode=lora", "stage=finetune"]
    full = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "a"), *common))
    stopped = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "b"), *common, "train.stop_after=5"))
    assert stopped["stopped_at"] == 5 and not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "checkpoint-3").is_dir()
    resumed = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "b"), *common), resume=True)
    assert resumed["steps"] == full["steps"] == 8
    # metrics.jsonl of b holds steps 1-5 of the killed run, then 4-8 of the resumed one
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert b[:5] == a[:5] and b[5:] == a[3:]
    for name in ("adapter.safetensors",):
        wa, wb = load_file(tmp_path / "a/final" / name), load_file(tmp_path / "b/final" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = load_file(tmp_path / "a/final/llm_lora/adapter_model.safetensors")
    lb = load_file(tmp_path / "b/final/llm_lora/adapter_model.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_accumulated_micro_batches_train_like_one_batch(experts, tiny_vqa, tmp_path):
    # Answers of different token counts: weighting each micro-batch's mean loss equally would
    # over-weight the tokens of short answers (the losses differ by ~1e-2 then).
    records = json.loads(Path(tiny_vqa["train"]).read_text())
    records = [{**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": " ".join(
        [r["conversations"][1]["value"]] * (1 + i % 4))}]} for i, r in enumerate(records[:24])]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    data = {**tiny_vqa, "train": str(tmp_path / "mixed.json")}
    common = ["train.max_steps=6", "train.lr=1e-2"]
    run(tiny_recipe(experts, data, str(tmp_path / "one"), *common, "train.batch_size=4"))
    run(tiny_recipe(experts, data, str(tmp_path / "acc"), *common, "train.batch_size=2", "train.grad_accum=2"))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "acc")
    assert len(a) == len(b) == 6 and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa = load_file(tmp_path / "one" / "final" / "adapter.safetensors")
    wb = load_file(tmp_path / "acc" / "final" / "adapter.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_a_foreign_final_directory_is_refused_before_training(experts, tiny_vqa, tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"final exists and is not an earlier seechat output"):
        run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run")))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
    assert (tmp_path / "run" / "final" / "notes.txt").read_text() == "mine"


@pytest.fixture()
def broken_data(tiny_vqa, tmp_path):
    """The tiny set as JSONL with a corrupt image and a malformed line."""
    root = Path(tiny_vqa["root"])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    samples = json.loads(Path(tiny_vqa["train"]).read_text())[:8]
    samples[2] = {**samples[2], "id": "bad-image", "image": str(tmp_path / "corrupt.png")}
    lines = [json.dumps(s) for s in samples]
    lines.insert(5, '{"id": "half-written", "conversations": [')
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {**tiny_vqa, "train": str(path), "root": str(root)}


def test_on_error_skip_counts_bad_samples(experts, broken_data, tmp_path):
    recipe = tiny_recipe(experts, broken_data, str(tmp_path / "run"), "data.on_error=skip",
                         "train.max_steps=3", "train.batch_size=8")
    summary = run(recipe)
    reasons = dict(summary["skipped"])
    assert len(summary["skipped"]) == 2
    assert "bad-image" in reasons
    assert any(key.endswith("broken.jsonl:6") for key in reasons)


def test_on_error_raise_names_sample_and_file(experts, broken_data, tmp_path):
    with pytest.raises(SampleError, match=r"broken\.jsonl.*6|6.*broken\.jsonl"):
        run(tiny_recipe(experts, broken_data, str(tmp_path / "run"), "train.max_steps=3"))
    lines = Path(broken_data["train"]).read_text().splitlines()
    del lines[5]
    Path(broken_data["train"]).write_text("\n".join(lines))
    with pytest.raises(SampleError, match=r"bad-image.*corrupt\.png|corrupt\.png.*bad-image"):
        run(tiny_recipe(experts, broken_data, str(tmp_path / "run2"), "train.max_steps=3",
                        "train.batch_size=8", "data.num_workers=0"))


def test_finetune_from_align_and_evaluate(experts, tiny_vqa, tmp_path):
    align = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "align"), "train.max_steps=2"))
    final = Path(align["final"])  # align trains only the adapter: nothing else is stored
    assert (final / "adapter.safetensors").is_file()
    assert not (final / "llm").exists() and not (final / "encoder.safetensors").exists()
    ft = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "ft"), "stage=finetune",
                         f"model.init_from={align['final']}", "train.max_steps=2"))
    model = load(ft["final"])
    assert model.modes == {"encoder": "frozen", "adapter": "full", "llm": "full"}
    aligned = load(align["final"])
    adapter_a = load_file(Path(align["final"]) / "adapter.safetensors")
    assert all(torch.equal(aligned.adapter.state_dict()[k], v) for k, v in adapter_a.items())
    result = evaluate_file(model, tiny_vqa["test"], image_root=tiny_vqa["root"], batch_size=5,
                           predictions_path=tmp_path / "predictions.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert result["n"] == len(rows) == 24
    assert result["correct"] == sum(r["correct"] for r in rows)
    assert all(r["answer"] in ("red", "blue", "green") for r in rows)
    # Rows follow the file, also when ids repeat.
    records = json.loads(Path(tiny_vqa["test"]).read_text())
    for r in records[1::2]:
        r["id"] = "same"
    duplicated = tmp_path / "duplicated.json"
    duplicated.write_text(json.dumps(records))
    evaluate_file(model, str(duplicated), image_root=tiny_vqa["root"], batch_size=5,
                  predictions_path=tmp_path / "dup.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "dup.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [r["conversations"][-1]["value"] for r in records]


def test_answer_normalisation():
    assert normalize_answer(" The Red.") == "red"
    assert normalize_answer("Two circles!") == "2 circles"
    assert normalize_answer("yes") != normalize_answer("no")


def test_recipe_inherit_override_and_unknown_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("stage: align\ntrain: {lr: 1.0e-3, batch_size: 4}\nmodel: {adapter: qformer}\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\ntrain: {batch_size: 8}\n")
    r = load_recipe(tmp_path / "child.yaml", ["train.lr=2e-4", "adapter.num_queries=64"])
    assert r["train"] == {**r["train"], "lr": 2e-4, "batch_size": 8}
    assert r["model"]["adapter"]["type"] == "qformer" and r["model"]["adapter"]["num_queries"] == 64
    assert r["model"]["adapter"]["num_layers"] == "auto"  # from the card: derived from the LM at build
    r = load_recipe(tmp_path / "child.yaml", ["adapter=resampler256"])
    assert r["model"]["adapter"] == {"type": "resampler", "grid_size": "auto", "embed_dim": "auto", "num_heads": "auto"}
    with pytest.raises(RecipeError, match="did you mean 'lr'"):
        load_recipe(tmp_path / "child.yaml", ["train.lrr=1"])
    with pytest.raises(RecipeError, match="did you mean 'num_queries'"):
        load_recipe(tmp_path / "child.yaml", ["adapter.num_querys=3"])
    with pytest.raises(RecipeError, match="valid cards: .*mlp2x_gelu.*qformer"):
        load_recipe(tmp_path / "child.yaml", ["adapter=perceiver"])
    with pytest.raises(ValueError, match="valid modes for llm"):
        from seechat.models.kinds import stage_modes

        stage_modes("finetune", {"llm": {"mode": "lora8"}})


def test_image_boundary_tokens_wrap_every_image(experts, tiny_vqa):
    from seechat.data import encode_prompt, read_llava_records, tokenize_conversation
    from seechat.models.llm import load_tokenizer

    plain = load_tokenizer({"name_or_path": experts["llama"]})
    wrapped = load_tokenizer({"name_or_path": experts["llama"], "image_boundary_tokens": True})
    start, end, image = (wrapped.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_end>", "<image>"))
    sample = next(r for r in read_llava_records(tiny_vqa["train"]).records if r["id"] == "two-images")
    from seechat.data import normalize_sample

    sample = normalize_sample(sample, 0)
    ids = tokenize_conversation(sample, wrapped, num_image_tokens=5)["input_ids"]
    runs = [i for i, t in enumerate(ids) if t == start]
    assert len(runs) == 2
    for i in runs:
        assert ids[i + 1 : i + 6] == [image] * 5 and ids[i + 6] == end
    assert len(ids) == len(tokenize_conversation(sample, plain, num_image_tokens=5)["input_ids"]) + 4
    prompt = encode_prompt(sample["conversations"][:1], wrapped, num_image_tokens=5)
    assert prompt.count(start) == prompt.count(end) == 2 and start not in encode_prompt(
        sample["conversations"][:1], plain, num_image_tokens=5)


def test_chat_answers_from_a_saved_model(experts, tiny_vqa, tmp_path):
    summary = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "train.max_steps=1"))
    model = load(summary["final"])
    image = Path(tiny_vqa["root"]) / "images" / "0.png"
    answer = model.chat("What color is the shape?", str(image), max_new_tokens=4)
    pixels = model.image_transform(__import__("PIL.Image").Image.open(image).convert("RGB"))[None]
    from seechat.data import encode_prompt

    ids = encode_prompt([{"from": "human", "value": "<image>\nWhat color is the shape?"}], model.tokenizer,
                        model.num_image_tokens)
    tokens = model.generate(torch.tensor([ids]), pixel_values=pixels, num_images=torch.tensor([1]), max_new_tokens=4)
    assert answer == model.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    assert isinstance(model.chat("Name a color.", max_new_tokens=3), str)


def test_data_val_is_validated_on_the_way_and_changes_no_training_number(experts, tiny_vqa, tmp_path, capsys):
    from seechat.training.plots import read_metrics

    common = ["stage=finetune", "llm.mode=lora", "train.max_steps=5"]  # LoRA dropout draws from the RNG
    plain = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "plain"), *common))
    out = tmp_path / "val"
    summary = run(tiny_recipe(experts, tiny_vqa, str(out), *common, f"data.val={tiny_vqa['test']}", "eval.every=2",
                              "eval.max_samples=6", "eval.batch_size=4", "eval.max_new_tokens=2"),
                  evaluate=evaluate_file)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in rows if "val/accuracy" in r]
    assert [(r["step"], r["val/n"]) for r in validated] == [(2, 6), (4, 6), (5, 6)]  # every 2 steps, and the end
    # validation restores the RNG and training mode: the same losses and weights as without it
    assert [r["loss"] for r in rows if "loss" in r] == losses(tmp_path / "plain")
    wa = load_file(tmp_path / "plain/final/llm_lora/adapter_model.safetensors")
    wb = load_file(out / "final/llm_lora/adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the last one scores final/ as `seechat eval` would
    again = evaluate_file(load(summary["final"]), tiny_vqa["test"], image_root=tiny_vqa["root"], max_samples=6,
                          batch_size=4, max_new_tokens=2)
    last = validated[-1]
    assert (last["val/accuracy"], last["val/correct"]) == (again["accuracy"], again["correct"]) == (
        summary["val_accuracy"], round(summary["val_accuracy"] * 6))
    assert f"step 5: val/accuracy {again['accuracy']:.4f} ({again['correct']}/6, {tiny_vqa['test']})" in (
        capsys.readouterr().out)
    merged = read_metrics(out / "metrics.jsonl")  # a step's training and validation records are one
    assert [sorted(r) for r in merged][1] == ["loss", "lr", "samples_per_s", "seconds", "step", "val/accuracy",
                                              "val/correct", "val/n"]
    assert (out / "logs" / "val_accuracy.png").is_file()
    assert plain["steps"] == summary["steps"] == 5 and "val_accuracy" not in plain


def test_data_val_without_an_evaluator_is_refused_before_anything_runs(experts, tiny_vqa, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(experts, tiny_vqa, str(out), f"data.val={tiny_vqa['test']}")
    with pytest.raises(ValueError, match=r"data.val='.*test.json' is set, but this call of seechat.training.loop.run "
                                         r"got no evaluate=: pass run\(recipe, evaluate=seechat.inference.evaluate"):
        run(recipe)
    with pytest.raises(FileNotFoundError, match=r"data.val file .*missing.json does not exist"):
        run(tiny_recipe(experts, tiny_vqa, str(out), f"data.val={tmp_path / 'missing.json'}"), evaluate=evaluate_file)
    assert not out.exists()


def test_progress_writes_lines_not_bars_when_stderr_is_no_terminal():
    import io

    from seechat.training.metrics import Progress

    stream = io.StringIO()  # isatty() is False, as for a log file
    progress = Progress(total=3, initial=0, desc="align", enabled=True, stream=stream, every_seconds=float("inf"))
    for loss in ("0.5000", "0.4000", "0.3000"):
        progress.update(loss=loss, lr="1.00e-03")
    progress.close()
    assert stream.getvalue() == "align: step 3/3 loss 0.3000 lr 1.00e-03\n"  # the last step only, no \r redraws
