"""What one request may cost, and the checks that hold it to that before any expensive step.

Order of the checks in a request (seechat/inference/serve/routes.py): the body's size (from
Content-Length, then while it is read, under a time limit) -> JSON -> the parameters here
(types, finite numbers, ranges) -> the messages (image parts counted, paths checked as strings,
text valid Unicode and bounded) -> prompt tokens + max_tokens within the model's context -> a
place in the queue (429 when full) -> images decoded, at most `decode_workers` at a time -> the
batch. Every limit is a `seechat serve` option (`Limits`, settings.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from seechat.inference.serve.errors import APIError
from seechat.inference.serve.settings import Limits


@dataclass
class Params:
    """The validated parameters of one chat completion request."""

    model: str
    messages: list
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stops: list[str]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; NaN/Infinity literals and invalid UTF-8 are 400s."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, "the request body is not valid JSON (UTF-8, no NaN or Infinity)") from None


def check_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode (JSON allows lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where}: text is not valid Unicode (a lone surrogate)", where) from None
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise APIError(400, f"{name} must be in {bound}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise APIError(400, f"{name} must be an integer", name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be in [{low}, {high}]", name)
    return value


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops):
        raise APIError(400, "stop must be a string or a list of at most 4 non-empty strings of at most 256 characters",
                       "stop")
    return [check_text(s, "stop") for s in stops]


def parse_params(body: Any) -> Params:
    """Validated parameters; an `APIError` (400) naming the first bad one otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in ("model", "messages"):
        if name not in body:
            raise APIError(400, f"{name}: field required", name)
    if not isinstance(body["model"], str):
        raise APIError(400, "model must be a string", "model")
    if not isinstance(body["messages"], list):
        raise APIError(400, "messages must be a list of messages", "messages")
    for name in ("stream",):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(400, f"{name} must be true or false", name)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
    if body.get("n") is not None and body.get("n") != 1:
        raise APIError(400, "n must be 1", "n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1, 2**31 - 1)
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
    return Params(
        model=body["model"], messages=body["messages"], stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage", False)), max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 2**31 - 1) or 0,
        seed=seed, stops=_stops(body.get("stop")),
    )


def answer_budget(prompt_tokens: int, requested: int | None, limits: Limits, context: int) -> int:
    """How many tokens the answer may have: `requested` capped by the server's max_new_tokens, or
    without a request as many as fit. Prompt + requested over `context` is a 400 naming the numbers."""
    if requested is not None and prompt_tokens + requested > context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {requested}: together over "
                            f"the model's context of {context} tokens; lower max_tokens or shorten the messages",
                       "max_tokens", "context_length_exceeded")
    budget = min(limits.max_new_tokens, context - prompt_tokens if requested is None else requested)
    if budget < 1:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens: it leaves no room for an answer in the "
                            f"model's context of {context} tokens; shorten the messages", "messages",
                       "context_length_exceeded")
    return budget
