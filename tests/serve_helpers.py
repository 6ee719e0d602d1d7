"""Shared by the tests/test_serve_*.py files: a model, a server on a free loopback port, a gate
that holds the scheduler inside a decoding step (to fill queues deterministically)."""
from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import uvicorn

from seechat.inference.serve import create_app, server_config
from seechat.inference.serve.settings import Limits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text, *urls):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


@contextlib.contextmanager
def running(model, limits: Limits | None = None, name: str = "tiny", **app_kwargs):
    """A server for `model` on a free loopback port; yields (base URL, the ASGI app)."""
    limits = limits or Limits()
    app = create_app(model, name, limits=limits, **app_kwargs)
    port = free_port()
    server = uvicorn.Server(server_config(app, port=port, limits=limits, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise TimeoutError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def scheduler_of(app):
    return app.app.state.scheduler  # Guard -> FastAPI


class Gate:
    """While closed, the scheduler thread stops at the start of its next LM forward."""

    def __init__(self, model):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.open.set()
        self.forwards = 0
        self.widest = 0  # the largest batch one forward saw
        self.handle = model.llm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.forwards += 1
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            self.widest = max(self.widest, int(embeds.shape[0]))
        if not self.open.is_set():
            self.entered.set()
            self.open.wait(30)

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def remove(self) -> None:
        self.open.set()
        self.handle.remove()


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
