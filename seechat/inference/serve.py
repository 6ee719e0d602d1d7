"""`seechat serve`: an OpenAI-compatible HTTP server for a saved model (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (messages with text and `image_url` content parts;
`stream: true` sends server-sent events in OpenAI's chunk format ending with `data: [DONE]`),
`GET /v1/models`, `GET /health`. Images are data URLs, or local paths (`file://...` or plain)
inside `image_dir` when one is given - a server must not read any file a client names.
Remote http(s) URLs are refused (seechat runs offline; send the bytes as a data URL).
Answers are greedy unless `temperature > 0`. Errors are OpenAI-style JSON
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status; the server keeps serving.
One generation runs at a time (a lock): the model is not re-entrant and the CPU is shared.
"""
from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from seechat.models.prompting import reply, user_text
from seechat.data import SampleError, load_image
from seechat.models.base import SeeChatVLM

ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
# What one request may hold: a request must not be able to take the server's memory or time.
MAX_IMAGE_BYTES = 20 * 2**20  # per image, decoded
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES = 8


class _Cancelled(Exception):
    """Raised in the generation thread when the streaming client has gone away."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI parameters seechat ignores (user, ...)

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1


def _error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def decode_image_url(url: str, image_dir: Path | None, where: str):
    """A data URL or an allowed local path -> RGB PIL image; `APIError` (400) otherwise."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: data URL must be base64-encoded (data:image/png;base64,...)", where)
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise APIError(400, f"{where}: image is larger than {MAX_IMAGE_BYTES // 2**20} MiB", where, "invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"{where}: data URL is not valid base64: {err}", where, "invalid_image") from None
        source: Any = {"bytes": data, "path": f"{where} (data URL)"}
    elif url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: remote image URLs are not fetched; send the image as a data URL", where)
    else:
        if image_dir is None:
            raise APIError(400, f"{where}: local image paths are disabled; start the server with --image-dir", where)
        path = Path(url.removeprefix("file://")).expanduser()
        path = (path if path.is_absolute() else image_dir / path).resolve()
        if not path.is_relative_to(image_dir):
            raise APIError(400, f"{where}: {url} is outside the server's image directory", where)
        source = path
    try:
        return load_image(source, max_pixels=MAX_IMAGE_PIXELS)
    except SampleError as err:
        raise APIError(400, f"{where}: {err.problem} ({err.file or url})", where, "invalid_image") from None


def to_conversation(messages: list[dict[str, Any]], image_dir: Path | None) -> tuple[list[dict], list]:
    """OpenAI messages -> seechat turns (images first in a turn, as seechat writes them) + images."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    turns, images = [], []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role={role!r}; valid: {sorted(ROLES)}", f"messages[{i}].role")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        texts, turn_images = [], []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url" and role == "user":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise APIError(400, f"{where}: image_url.url must be a string", where)
                turn_images.append(decode_image_url(url, image_dir, where))
            else:
                raise APIError(400, f"{where}: unsupported content part {kind!r} for role {role!r}", where)
        turns.append({"from": ROLES[role], "value": user_text(" ".join(texts), len(turn_images))})
        images += turn_images
    if turns[-1]["from"] != "human":
        raise APIError(400, "the last message must come from the user", f"messages[{len(messages) - 1}].role")
    return turns, images


def create_app(model: SeeChatVLM, model_name: str, image_dir: str | Path | None = None,
               max_new_tokens: int = 256) -> FastAPI:
    """The FastAPI application serving `model` under the name `model_name`."""
    app = FastAPI(title="seechat", description=__doc__)
    lock = threading.Lock()
    allowed_dir = Path(image_dir).resolve() if image_dir else None
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(_error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(_error_body(400, message, param, None), status_code=400)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "seechat"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        if request.model != model_name:
            raise APIError(404, f"model {request.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        if request.n != 1:
            raise APIError(400, "n must be 1", "n")
        turns, images = to_conversation(request.messages, allowed_dir)
        if len(images) > MAX_IMAGES:
            raise APIError(400, f"{len(images)} images in one request; at most {MAX_IMAGES}", "messages")
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if requested is not None and requested < 1:
            raise APIError(400, "max_tokens must be at least 1", "max_tokens")
        # the server's --max-new-tokens is a cap, not only a default
        limit = max_new_tokens if requested is None else min(requested, max_new_tokens)
        if request.temperature is not None and request.temperature < 0:
            raise APIError(400, "temperature must be >= 0", "temperature")
        if request.top_p is not None and not 0 < request.top_p <= 1:
            raise APIError(400, "top_p must be in (0, 1]", "top_p")
        sampling: dict[str, Any] = {}
        if request.temperature:  # None or 0: greedy
            sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p or 1.0}
            if request.seed is not None:
                sampling["generator"] = torch.Generator(device=model.device).manual_seed(request.seed)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            return StreamingResponse(_stream(model, lock, meta, turns, images, limit, sampling),
                                     media_type="text/event-stream")
        with lock:
            try:
                out = reply(model, turns, images, limit, **sampling)
            except ValueError as err:  # e.g. a literal <image> in the text, a prompt too long
                raise APIError(400, str(err), "messages") from None
        return {
            **meta,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": "stop" if out.stopped else "length"}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }

    return app


def _stream(model: SeeChatVLM, lock: threading.Lock, meta: dict, turns: list, images: list, limit: int,
            sampling: dict) -> Iterator[str]:
    """Server-sent events: a role chunk, one chunk per text piece, a finish chunk, [DONE]."""
    pieces: queue.Queue = queue.Queue()
    gone = threading.Event()  # set when the client disconnects: generation stops, the lock is freed

    def on_text(piece: str) -> None:
        if gone.is_set():
            raise _Cancelled
        pieces.put(piece)

    def work() -> None:
        try:
            with lock:
                pieces.put(reply(model, turns, images, limit, on_text=on_text, **sampling))
        except _Cancelled:
            pass
        except Exception as err:  # reported to the client in the stream; the server lives on
            pieces.put(err)

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    threading.Thread(target=work, daemon=True).start()
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = pieces.get()
            if isinstance(item, str):
                yield chunk({"content": item})
            elif isinstance(item, Exception):
                status = 400 if isinstance(item, ValueError) else 500
                yield f"data: {json.dumps(_error_body(status, f'generation failed: {item}', None, None))}\n\n"
                break
            else:
                yield chunk({}, "stop" if item.stopped else "length")
                break
        yield "data: [DONE]\n\n"
    finally:  # also on GeneratorExit, when the client went away mid-stream
        gone.set()


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          image_dir: str | None = None, max_new_tokens: int = 256) -> None:
    """Load the saved model at `model_dir` and serve it until interrupted."""
    import uvicorn

    from seechat.models.kinds import load

    name = model_name or Path(model_dir).resolve().name
    app = create_app(load(model_dir), name, image_dir, max_new_tokens)
    uvicorn.run(app, host=host, port=port)
