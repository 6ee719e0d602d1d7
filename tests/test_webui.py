"""`seechat webui` driven in a real browser: headless Chromium (the Debian package) under
Playwright opens the page the command serves, uploads a picture, asks about it, reads the
streamed answers off the page and compares them with each model's own greedy answer; a native
model's column also draws. The run saves a screenshot (docs/images/webui.png is one)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from PIL import Image

import seechat
from seechat.training.loop import run
from conftest import COLORS, tiny_recipe
from test_serve import free_port
from vlm_helpers import saved_model, shape_image

QUESTION = "what color is the shape?"
CHROMIUM = os.environ.get("SEECHAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("SEECHAT_WEBUI_SCREENSHOT")  # also save it here (how docs/images/webui.png is made)


def native_model(experts: dict, root: Path) -> Path:
    """An untrained native model (a tiny VQ tokenizer trained for one epoch) saved to `root`."""
    from seechat.config import load_recipe
    from seechat.models.encoders.base import clip_style_transform
    from seechat.models.kinds import build_model, stage_modes
    from seechat.models.native.vq import HALF, train_vq

    transform = clip_style_transform(16, HALF, HALF)
    images = torch.stack([transform(shape_image(color, (16, 16))) for color in COLORS.values()] * 4)
    train_vq(images, epochs=1, batch_size=4, channels=16, downsample=2, levels=(5, 5, 5)).save_pretrained(root / "vq")
    (root / "data.json").write_text('[{"id": "0", "conversations": [{"from": "human", "value": "hi"}, '
                                    '{"from": "gpt", "value": "red"}]}]')
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "stage": "finetune", "output_dir": str(root / "run"), "data": {"train": str(root / "data.json")},
        "model": {"kind": "native", "native": {"vq": str(root / "vq")}, "llm": {
            "tokenizer": experts["tokenizer"], "attn_implementation": "eager", "config": {
                "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}}}}))
    recipe = load_recipe(root / "recipe.yaml")
    torch.manual_seed(0)
    model = build_model(recipe["model"], stage_modes("finetune", recipe["model"]))
    model.save_pretrained(root / "native")
    return root / "native"


def wait_for_page(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"seechat webui exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"seechat webui did not answer at {url}")


@pytest.fixture(scope="module")
def page_of_two(experts, tiny_vqa, tmp_path_factory):
    """`seechat webui --model STITCHED --model NATIVE` running in a subprocess: a stitched model
    trained for a few seconds on colored shapes, and an untrained native one."""
    root = tmp_path_factory.mktemp("webui")
    summary = run(tiny_recipe(experts, tiny_vqa, str(root / "run"), "stage=finetune", "train.max_steps=60",
                              "train.batch_size=8", "train.log_every=60"))
    stitched = root / "stitched"  # (the column's title: the name the model is given by)
    stitched.symlink_to(summary["final"])
    native = native_model(experts, root)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "seechat.cli", "webui", "--model", str(stitched), "--model", str(native),
         "--port", str(port), "--max-new-tokens", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, process)
        yield {"url": url, "root": root, "models": [stitched, native]}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (.ci/run installs it)")
def test_browser_uploads_asks_and_reads_the_streamed_answers(page_of_two):
    from playwright.sync_api import expect, sync_playwright

    root = page_of_two["root"]
    image = shape_image(COLORS["red"])
    image.save(root / "red.png")
    expected = [seechat.load(m).chat(QUESTION, images=[image], max_new_tokens=12) for m in page_of_two["models"]]
    assert all(expected), expected  # something to read off the page

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(page_of_two["url"])
        # one column per model, titled by its directory name; only the native one draws
        expect(page.get_by_role("heading", name="stitched")).to_be_visible(timeout=120_000)
        expect(page.get_by_role("heading", name="native")).to_be_visible()
        expect(page.locator("#draw-1")).to_have_count(1)  # the columns render after their headings
        assert page.locator("#draw-0").count() == 0

        page.locator("#image input[type=file]").set_input_files(str(root / "red.png"))
        expect(page.locator("#image img")).to_be_visible(timeout=60_000)
        page.locator("#question textarea").fill(QUESTION)
        page.locator("#ask").click()
        for i in range(2):
            expect(page.locator(f"#status-{i}")).to_contain_text("done:", timeout=120_000)
        answers = [page.locator(f"#answer-{i} textarea").input_value() for i in range(2)]
        assert answers == expected

        page.locator("#draw-prompt-1 textarea").fill("draw a red circle")
        page.locator("#draw-1").click()
        drawing = page.locator("#drawing-1 img")
        expect(drawing).to_be_visible(timeout=120_000)
        shown = Image.open(io.BytesIO(httpx.get(drawing.get_attribute("src")).content)).convert("RGB")

        shot = root / "webui.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    # the page shows the model's own drawing for that prompt, temperature and seed, enlarged 16x
    generator = torch.Generator().manual_seed(0)
    own = seechat.load(page_of_two["models"][1]).generate_images(["draw a red circle"], temperature=1.0,
                                                                  generator=generator)[0]
    assert own.size == (16, 16) and shown.size == (256, 256)
    assert list(shown.getdata()) == list(own.resize((256, 256), Image.NEAREST).getdata())
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)


def test_column_titles_are_directory_names_made_distinct(tmp_path):
    from seechat.inference.webui import column_names

    assert column_names(["runs/a/final", "runs/b/other"]) == ["final", "other"]
    assert column_names(["runs/a/final", "runs/b/final"]) == ["a/final", "b/final"]
    assert column_names(["runs/a/final", "runs/a/final"]) == ["a/final (1)", "a/final (2)"]
    (tmp_path / "real").mkdir()
    (tmp_path / "shown").symlink_to(tmp_path / "real")
    assert column_names([tmp_path / "shown"]) == ["shown"]


def test_streamed_answer_is_the_greedy_chat_answer_and_an_empty_question_is_refused(experts, tmp_path):
    import gradio as gr

    from seechat.inference.webui import Column, build_ui, stream_answer

    column = Column("tiny", seechat.load(saved_model(experts, tmp_path / "tiny")))
    image = shape_image()
    steps = list(stream_answer(column, image, "  " + QUESTION + " ", max_new_tokens=6))
    expected = column.model.chat(QUESTION, images=[image], max_new_tokens=6)
    texts = [text for text, _ in steps]
    assert texts[0] == "" and texts[-1] == expected
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # it grows
    assert steps[-1][1].startswith("done: 6 tokens in ") and "stopped at 6 tokens" in steps[-1][1]
    assert not column.draws  # a stitched model gets no Draw box
    with pytest.raises(gr.Error, match="type a question first"):
        list(stream_answer(column, image, "   ", max_new_tokens=6))
    with pytest.raises(ValueError, match="at least one model"):
        build_ui([])
