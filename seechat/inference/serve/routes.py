"""The application: `/v1/chat/completions`, `/v1/models`, `/health`, all handlers asynchronous.

No handler blocks the event loop or holds a thread while it waits: tokenising and image decoding
run in worker threads (decoding under a semaphore), generation in the scheduler's thread, and a
request waits for its events on an asyncio Event. So `/health` answers while hundreds of
requests wait. A streamed answer starts only with its first piece of text: whatever fails
before it is an ordinary HTTP error, never a 200 stream carrying an error; one after it is an
error event in OpenAI's format (the request id, nothing internal) followed by `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from seechat.inference.serve.auth import LOOPBACK_HOSTS, Guard
from seechat.inference.serve.errors import APIError, error_body, install_handlers, log, new_request_id, request_id
from seechat.inference.serve.limits import Limits, Params, answer_budget, parse_json, parse_params
from seechat.inference.serve.messages import decode, to_conversation
from seechat.inference.serve.scheduler import Job, Result, Scheduler
from seechat.models.decoding import Sampling, image_features
from seechat.models.prompting import prompt_ids

CHARS_PER_TOKEN = 32  # no real prompt averages more characters per token: a cheap bound before tokenising
DISCONNECT_POLL_S = 0.25


def model_context(model: Any, limits: Limits) -> int:
    """Prompt + answer tokens the model can take: --max-context, else the LM's positions."""
    if limits.max_context:
        return limits.max_context
    config = model.base_llm.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 2048)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused (413) past `max_body_bytes` - from Content-Length before reading, or as
    it arrives - and (408) when it takes longer than `body_timeout`."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is over {limits.max_body_bytes / 2**20:g} MiB", None,
                       "request_too_large")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s", None,
                       "timeout") from None
    return b"".join(chunks)


def sampling_of(params: Params, device: torch.device) -> Sampling:
    if not params.temperature:  # 0 or absent: greedy
        return Sampling()
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    return Sampling(True, params.temperature, params.top_k, params.top_p, generator)


async def next_event(job: Job, request: Request, scheduler: Scheduler) -> tuple[str, Any]:
    """The job's next event; kind "gone" when the client has left meanwhile. Past the job's
    deadline the scheduler is told once (`expire`), and its answer to that follows as events."""
    while True:
        event = await job.next(DISCONNECT_POLL_S)
        if event is not None:
            return event
        if await request.is_disconnected():
            return "gone", None
        if time.monotonic() > job.deadline and not job.timed_out:
            job.timed_out = True
            scheduler.expire(job)


def _completion(meta: dict, result: Result) -> dict:
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": _usage(result)}


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _chunk(meta: dict, delta: dict, finish: str | None = None, **extra: Any) -> str:
    body = {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def _error_event(err: Any, rid: str) -> str:
    """The stream's error event: the APIError's status and message (they name the request id,
    nothing internal); anything else as a plain internal error."""
    if not isinstance(err, APIError):
        err = APIError(500, f"internal error (request id {rid}); the server log has the cause")
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"


async def _events(job: Job, first: tuple[str, Any], meta: dict, include_usage: bool,
                  scheduler: Scheduler) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per text piece, a finish chunk, [DONE]."""
    try:
        yield _chunk(meta, {"role": "assistant", "content": ""})
        kind, value = first
        while True:
            if kind == "text":
                yield _chunk(meta, {"content": value})
            elif kind == "done":
                yield _chunk(meta, {}, value.finish_reason)
                if include_usage:
                    yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(value)})}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:  # a failure after the answer began: an error event (OpenAI's format), then [DONE]
                log.error("request %s: the stream ended early: %s", job.request_id, getattr(value, "message", value))
                yield _error_event(value, job.request_id)
                yield "data: [DONE]\n\n"
                return
            kind, value = await job.next()
    finally:  # also when the client went away mid-stream (the task is cancelled)
        scheduler.cancel(job)


async def _prepare(request: Request, state: dict) -> tuple[Params, list[int], Any, int]:
    """Everything cheap that can refuse a request, in order; then its images, decoded."""
    limits, model = state["limits"], state["model"]
    params = parse_params(parse_json(await read_body(request, limits)))
    if params.model != state["name"]:
        raise APIError(404, f"model {params.model[:100]!r} does not exist; this server serves {state['name']!r}",
                       "model", "model_not_found")
    context = state["context"]
    if len(params.messages) > context:
        raise APIError(400, f"{len(params.messages)} messages cannot fit the model's context of {context} tokens",
                       "messages", "context_length_exceeded")
    turns, images = to_conversation(params.messages, state["image_dir"], limits, context * CHARS_PER_TOKEN)
    try:
        ids = await anyio.to_thread.run_sync(prompt_ids, model.tokenizer, turns, model.num_image_tokens)
    except ValueError as err:  # a literal <image> without its image; a template refusing the turns
        log.info("request %s: prompt refused: %s", request_id(request), err)
        raise APIError(400, _prompt_problem(err), "messages") from None
    budget = answer_budget(len(ids), params.max_tokens, limits, context)
    return params, ids, images, budget


def _prompt_problem(err: ValueError) -> str:
    text = str(err)
    if "<image>" in text:
        return "the text holds <image> markers that do not match the image parts; remove literal <image> from the text"
    return "the model's chat template cannot render these messages (e.g. roles must alternate)"


async def _pixels(images: list, state: dict, rid: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The request's images decoded, and their encoder outputs where the model takes those (run
    here, in a worker thread under the same semaphore, not in the decoding thread)."""
    if not images:
        return None, None
    semaphore, limits, model = state["decode_slots"], state["limits"], state["model"]
    pixels = []
    for ref in images:
        async with semaphore:
            pixels.append(await anyio.to_thread.run_sync(decode, ref, limits, model.image_transform, rid))
    async with semaphore:
        stacked = torch.stack(pixels)
        return stacked, await anyio.to_thread.run_sync(image_features, model, stacked)


def create_app(model: Any, model_name: str, image_dir: str | Path | None = None, max_new_tokens: int = 256, *,
               limits: Limits | None = None, api_keys: tuple[str, ...] = (),
               allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS, docs: bool = False) -> Guard:
    """The ASGI application serving `model` under the name `model_name`."""
    limits = limits or Limits(max_new_tokens=max_new_tokens)
    scheduler = Scheduler(model, limits.max_batch, limits.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.stop()

    app = FastAPI(title="seechat", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    state = {"model": model, "name": model_name, "limits": limits, "context": model_context(model, limits),
             "image_dir": Path(image_dir).resolve() if image_dir else None, "decode_slots": asyncio.Semaphore(limits.decode_workers)}
    app.state.scheduler = scheduler
    install_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health(request: Request) -> dict:
        return {"status": "ok", **({"model": model_name} if request.state.authenticated else {})}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "seechat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        rid = request_id(request) or new_request_id()
        params, ids, images, budget = await _prepare(request, state)
        scheduler.reserve()  # 429 when the queue is full, before any image is decoded
        try:
            pixels, features = await _pixels(images, state, rid)
        except BaseException:
            scheduler.release()
            raise
        job = scheduler.submit(ids, pixels, budget, sampling_of(params, model.device), params.stops,
                               limits.request_timeout, rid, streaming=params.stream, features=features)
        meta = {"id": f"chatcmpl-{rid.removeprefix('req_')}", "created": int(time.time()), "model": model_name}
        return await _answer(request, job, params, meta, scheduler)

    return Guard(app, api_keys, allowed_hosts, docs)


async def _answer(request: Request, job: Job, params: Params, meta: dict, scheduler: Scheduler):
    streaming = False
    try:
        event = await next_event(job, request, scheduler)
        if event[0] == "error":
            raise event[1]
        if event[0] == "gone":
            return None
        if params.stream:
            streaming = True  # from here the stream's own `finally` cancels the job
            return StreamingResponse(_events(job, event, meta, params.include_usage, scheduler),
                                     media_type="text/event-stream")
        while event[0] == "text":
            event = await next_event(job, request, scheduler)
        if event[0] == "error":
            raise event[1]
        return None if event[0] == "gone" else _completion(meta, event[1])
    finally:
        if not streaming:
            scheduler.cancel(job)
