"""`seechat chat` one-shot and REPL, streaming, and the Python API (`seechat.load(...).chat`,
batched `prepare` + `generate` + `decode`, the README example)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import torch

import seechat
from seechat.inference.chat import repl
from seechat.cli import main
from seechat.data import encode_prompt
from vlm_helpers import saved_model, shape_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(experts, tmp_path_factory):
    return saved_model(experts, tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    shape_image((200, 30, 30)).save(root / "red.png")
    shape_image((30, 30, 200), size=(40, 56)).save(root / "blue.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def reference(model, turns, images, max_new_tokens=8):
    """The answer computed directly from token ids: what every chat path must reproduce."""
    ids = torch.tensor([encode_prompt(turns, model.tokenizer, model.num_image_tokens)])
    pixels = torch.stack([model.image_transform(seechat.data.load_image(i)) for i in images]) if images else None
    out = model.generate(ids, pixel_values=pixels, num_images=torch.tensor([len(images)]), max_new_tokens=max_new_tokens)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_one_shot_cli_positional_and_flag(model_dir, pictures, capsys):
    model = seechat.load(model_dir)
    image = str(pictures / "red.png")
    expected = reference(model, [{"from": "human", "value": "<image>\nwhat colour is the shape?"}], [image])
    assert main(["chat", "--model", str(model_dir), "--image", image, "--max-new-tokens", "8",
                 "what colour is the shape?"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["chat", "--model", str(model_dir), "--image", image, "--max-new-tokens", "8",
                 "--question", "what colour is the shape?"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # the old positional callers of model.chat(question, image, max_new_tokens) keep working
    assert model.chat("what colour is the shape?", image, 8) == expected


def test_streamed_pieces_join_to_the_answer(model_dir, pictures):
    model = seechat.load(model_dir)
    for prompt in ("what colour is the shape?", "Describe the picture in detail."):
        pieces = []
        streamed = model.chat(prompt, images=[pictures / "red.png"], max_new_tokens=16, on_text=pieces.append)
        assert len(pieces) >= 2  # really streamed, not one piece at the end
        assert "".join(pieces) == streamed == model.chat(prompt, images=[pictures / "red.png"], max_new_tokens=16)


def test_repl_multi_image_turns_reset_and_bad_file(model_dir, pictures):
    model = seechat.load(model_dir)
    calls = []
    generate = model.generate

    def spy(input_ids, *args, **kwargs):
        calls.append((input_ids.tolist(), kwargs.get("num_images").tolist()))
        return generate(input_ids, *args, **kwargs)

    model.generate = spy
    red, blue = str(pictures / "red.png"), str(pictures / "blue.png")
    lines = iter([f"/image {red}", "what colour?", f"/image {blue}", "and this one?",
                  f"/image {pictures / 'broken.png'}", "/image /no/such.png", "/reset", "Name a color.", "/bogus"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert repl(model, read=read, out=out, max_new_tokens=8) == 0
    text = out.getvalue()
    answers = re.findall(r"model> (.*)\n", text)
    assert len(answers) == 3
    model.generate = generate
    turn1 = {"from": "human", "value": "<image>\nwhat colour?"}
    turn2 = {"from": "human", "value": "<image>\nand this one?"}
    assert answers[0] == reference(model, [turn1], [red])
    second = [turn1, {"from": "gpt", "value": answers[0]}, turn2]
    assert answers[1] == reference(model, second, [red, blue])
    assert calls[1] == ([encode_prompt(second, model.tokenizer, model.num_image_tokens)], [2])
    # after /reset: no history, no images
    assert answers[2] == reference(model, [{"from": "human", "value": "Name a color."}], [])
    assert calls[2][1] == [0]
    assert f"error: {pictures / 'broken.png'}: cannot read image" in text
    assert "error: /no/such.png: image file not found" in text
    assert "unknown command /bogus" in text


def test_batched_generate_equals_one_by_one(model_dir, pictures):
    model = seechat.load(model_dir)
    prompts = ["what colour is the shape?", "Describe the picture in detail.", "Name a color."]
    images = [[pictures / "red.png"], [pictures / "red.png", pictures / "blue.png"], []]
    batch = model.prepare(prompts, images)
    assert batch["num_images"].tolist() == [1, 2, 0]
    batched = model.decode(model.generate(**batch, max_new_tokens=8))
    assert batched == [model.chat(p, images=i, max_new_tokens=8) for p, i in zip(prompts, images)]
    with pytest.raises(ValueError, match="3 prompts but 2 image lists"):
        model.prepare(prompts, images[:2])


def test_readme_python_example_runs(model_dir, pictures, tmp_path, monkeypatch):
    """The README's Python API example, run as written against a saved tiny model."""
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    os.makedirs(tmp_path / "runs" / "demo" / "finetune")
    os.symlink(model_dir, tmp_path / "runs" / "demo" / "finetune" / "final")
    for name in ("shape.png", "a.png", "b.png"):
        os.symlink(pictures / "red.png", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    model = seechat.load(model_dir)
    one = model.chat("What color is the shape?", images=["shape.png"])
    assert printed[0] == (one,)
    assert printed[1] == (model.decode(model.generate(**model.prepare(
        ["What shape is this?", "What color is it?"], [["a.png"], ["b.png"]]), max_new_tokens=8)),)


@pytest.mark.slow  # a fresh process imports torch and transformers
def test_repl_over_stdin_in_a_subprocess(model_dir, pictures):
    import subprocess
    import sys

    red = pictures / "red.png"
    script = f"/image {red}\nwhat colour?\n/quit\n"
    result = subprocess.run(
        [sys.executable, "-m", "seechat.cli", "chat", "--model", str(model_dir), "--max-new-tokens", "8"],
        input=script, capture_output=True, text=True, encoding="utf-8", timeout=600,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = seechat.load(model_dir)
    expected = reference(model, [{"from": "human", "value": "<image>\nwhat colour?"}], [str(red)])
    assert f"(image {red} attached to the next question)" in result.stdout
    assert f"model> {expected}\n" in result.stdout
