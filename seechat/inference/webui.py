"""`seechat webui`: a Gradio page over one or more saved models.

One image (uploaded, pasted or dropped) and one question go to every model given; each model
has its own column, where its greedy answer streams in (`seechat --model A --model B` puts two
models side by side on the same question). A model that can draw (a native early-fusion model:
it has `generate_images`) also gets a "Draw" box in its column, and the drawing is shown there.
Answers go through `seechat.models.prompting.reply`, the path `chat`, `serve` and `eval` take,
so the page shows the same answer as `seechat chat`. One generation runs per model at a time.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from seechat.errors import UserError
from seechat.models.base import SeeChatVLM
from seechat.models.prompting import reply, user_text

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # seechat runs offline; no telemetry

try:
    import gradio as gr  # noqa: E402  (after the analytics switch, which gradio reads on import)
except ModuleNotFoundError as err:  # an optional dependency: say how to get it
    raise UserError(f"seechat webui needs gradio ({err}); install it with: pip install 'seechat[webui]'") from None

TITLE = "seechat"
DRAWING_SIZE = 256  # pixels a drawing is shown at


@dataclass
class Column:
    """One model on the page: its name (the column's title), the model, and its lock (a model
    is not re-entrant; two browser tabs asking at once take turns)."""

    name: str
    model: SeeChatVLM
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def draws(self) -> bool:
        return hasattr(self.model, "generate_images")


def column_names(model_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Each model's title: its directory's name, with its parent's when two names collide
    (runs/a/final and runs/b/final -> a/final, b/final), numbered if still equal."""
    paths = [Path(os.path.abspath(d)) for d in model_dirs]  # (a symlink keeps its own name)
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def stream_answer(column: Column, image: Any, question: str, max_new_tokens: int) -> Iterator[tuple[str, str]]:
    """(answer so far, status line) as the greedy answer to `question` about `image` (a PIL
    image, or None for a text-only question) is generated."""
    question = (question or "").strip()
    if not question:
        raise gr.Error("type a question first")
    images = [] if image is None else [image]
    turns = [{"from": "human", "value": user_text(question, len(images))}]
    pieces: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            with column.lock:
                pieces.put(reply(column.model, turns, images, max_new_tokens, on_text=pieces.put))
        except Exception as err:  # shown in the column; the page lives on
            pieces.put(err)

    start = time.perf_counter()
    threading.Thread(target=work, daemon=True).start()
    text = ""
    yield text, "answering..."
    while True:
        item = pieces.get()
        if isinstance(item, str):
            text += item
            yield text, "answering..."
        elif isinstance(item, Exception):
            raise gr.Error(f"{column.name}: {item}")
        else:
            ended = "end of answer" if item.stopped else f"stopped at {max_new_tokens} tokens"
            yield item.text, (f"done: {item.completion_tokens} tokens in {time.perf_counter() - start:.1f} s "
                              f"({ended}, greedy)")
            return


def draw(column: Column, prompt: str, temperature: float, seed: float) -> Any:
    """The image a drawing model makes for `prompt` (PIL), sampled with `temperature` (0: greedy)
    from `seed`."""
    import torch

    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error('type what to draw first, e.g. "draw a red circle"')
    generator = torch.Generator(device=column.model.device).manual_seed(int(seed))
    with column.lock:
        image = column.model.generate_images([prompt], temperature=float(temperature), generator=generator)[0]
    return shown(image)


def shown(image: Any, size: int = DRAWING_SIZE) -> Any:
    """`image` enlarged by a whole factor to about `size` pixels, each pixel a block (a native
    model draws at its VQ size, e.g. 16 or 64 pixels: too small to see)."""
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), resample=0)  # 0: nearest


def _model_column(index: int, column: Column, image: gr.Image, question: gr.Textbox, ask: gr.Button,
                  max_new_tokens: int) -> None:
    """One model's column: its answer and status under the shared question; its drawing box."""
    gr.Markdown(f"### {column.name}")
    answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id=f"answer-{index}")
    status = gr.Markdown("", elem_id=f"status-{index}")

    def answer_fn(img, q):
        yield from stream_answer(column, img, q, max_new_tokens)

    for event in (ask.click, question.submit):
        event(answer_fn, inputs=[image, question], outputs=[answer, status], concurrency_limit=1,
              concurrency_id=f"model-{index}")
    if column.draws:
        with gr.Group():
            prompt = gr.Textbox(label="Draw", placeholder="draw a red circle", elem_id=f"draw-prompt-{index}")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.1, label="temperature (0: greedy)")
                seed = gr.Number(value=0, precision=0, label="seed")
            button = gr.Button("Draw", elem_id=f"draw-{index}")
            drawing = gr.Image(label="Drawing", type="pil", format="png", interactive=False, height=DRAWING_SIZE,
                               elem_id=f"drawing-{index}")
        button.click(lambda p, t, s: draw(column, p, t, s), inputs=[prompt, temperature, seed], outputs=drawing,
                     concurrency_limit=1, concurrency_id=f"model-{index}")


def build_ui(columns: Sequence[Column], max_new_tokens: int = 64) -> gr.Blocks:
    """The page: the image and the question on the left, one column per model on the right."""
    if not columns:
        raise ValueError("give at least one model")
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE}: ask {'each model' if len(columns) > 1 else 'the model'} about an image")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image (upload, paste or drop)", type="pil",
                                 sources=["upload", "clipboard"], height=256, elem_id="image")
                question = gr.Textbox(label="Question", placeholder="what color is the shape?", elem_id="question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            for index, column in enumerate(columns):
                with gr.Column(scale=1):
                    _model_column(index, column, image, question, ask, max_new_tokens)
    return page


def webui(model_dirs: Sequence[str | os.PathLike], host: str = "127.0.0.1", port: int = 7860,
          max_new_tokens: int = 64) -> None:
    """Load the saved models at `model_dirs` and serve the page until interrupted."""
    from seechat.models.kinds import load

    columns = [Column(name, load(d)) for name, d in zip(column_names(model_dirs), model_dirs)]
    page = build_ui(columns, max_new_tokens)
    page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, show_error=True)
