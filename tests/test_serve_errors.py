"""Every bad request is a 4xx in OpenAI's format - never a 500, never a 200 stream carrying an
error - and no error body tells the client about the server (paths, addresses, library text)."""
from __future__ import annotations

import json
import re

import httpx
import pytest

import seechat
from seechat.inference.serve.settings import Limits
from serve_helpers import data_url, running, scheduler_of, user
from vlm_helpers import saved_model, shape_image

LEAKS = re.compile(r"(/(tmp|home|work|etc|usr|root|proc)/|0x[0-9a-fA-F]{6,}|Traceback|alloc_cpu|Error:)")


@pytest.fixture(scope="module")
def served(experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = seechat.load(saved_model(experts, root / "model"))
    (root / "images").mkdir()
    shape_image().save(root / "images" / "red.png")
    with running(model, Limits(), image_dir=root / "images") as (base, app):
        yield {"base": base, "app": app, "model": model, "root": root}


def post(base, body=None, raw: bytes | None = None, **kwargs):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{base}/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=30, **kwargs)


def check_error(response, status: int, param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not LEAKS.search(response.text), response.text
    assert response.headers["x-request-id"].startswith("req_")
    if param is not None:
        assert error["param"] == param, error
    return error


def msg(text="red"):
    return [{"role": "user", "content": text}]


BAD_PARAMETERS = [
    ({"temperature": float("nan")}, None), ({"temperature": 1e308}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "many"}, "max_tokens"), ({"max_tokens": 2**40}, "max_tokens"),
    ({"n": 2}, "n"), ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": "y"}}, "stream_options"),
    ({"top_k": -1}, "top_k"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_sampling_parameters_are_400s_streamed_or_not(served, stream):
    for extra, param in BAD_PARAMETERS:
        body = {"model": "tiny", "messages": msg(), "stream": stream, **extra}
        raw = json.dumps(body, allow_nan=True).encode()
        error = check_error(post(served["base"], raw=raw), 400, param)
        assert error["type"] == "invalid_request_error"


def test_malformed_bodies_and_text(served):
    base = served["base"]
    check_error(post(base, raw=b"{not json"), 400)
    check_error(post(base, raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400)
    check_error(post(base, raw=b'{"model": "tiny", "messages": [], "temperature": NaN}'), 400)
    check_error(post(base, raw=b'{"model": "tiny", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400)
    check_error(post(base, raw=b"[1, 2]"), 400)
    lone = check_error(post(base, raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
                       400, "messages[0].content[0]")
    assert "Unicode" in lone["message"]
    check_error(post(base, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role")
    check_error(post(base, {"model": "tiny", "messages": ["hello"]}), 400, "messages[0]")
    check_error(post(base, {"model": "tiny", "messages": [{"role": "user", "content": 5}]}), 400,
                "messages[0].content")
    check_error(post(base, {"model": "tiny", "messages": [{"role": "user", "content": "<image> hi"}]}), 400,
                "messages[0].content[0]")
    check_error(post(base, {"model": 7, "messages": msg()}), 400, "model")
    assert check_error(post(base, {"model": "x" * 5000, "messages": msg()}), 404, "model")["code"] == "model_not_found"


def test_image_paths_are_checked_before_the_filesystem(served):
    base, root = served["base"], served["root"]
    for path, fragment in (("red\x00.png", "not a usable image path"), ("~root/.bashrc", "no such image"),
                           ("a" * 5000, "not a usable image path"), ("/etc/passwd", "outside"),
                           ("../../../etc/passwd", "outside"), ("missing.png", "no such image"),
                           ("file://" + "b/" * 600, "not a usable image path")):
        error = check_error(post(base, {"model": "tiny", "messages": [user("red", path)]}), 400,
                            "messages[0].content[0]")
        assert fragment in error["message"], (path, error)
    assert str(root) not in post(base, {"model": "tiny", "messages": [user("red", "missing.png")]}).text
    broken = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"  # a PNG cut short
    check_error(post(base, {"model": "tiny", "messages": [user("red", broken)]}), 400, "messages[0].content[0]")
    ok = post(base, {"model": "tiny", "messages": [user("red", "red.png")], "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_routes_and_methods_are_openai_errors(served):
    base = served["base"]
    assert check_error(httpx.get(f"{base}/v2/nothing"), 404)["type"] == "not_found_error"
    check_error(httpx.get(f"{base}/v1/chat/completions"), 405)


def test_a_failure_inside_generation_is_a_500_without_internals_streamed_or_not(served, monkeypatch):
    scheduler = scheduler_of(served["app"])

    def broken(seqs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] 0x7f3a5c001234 /work/secret/path 5140389708 bytes")

    monkeypatch.setattr(scheduler.decoder, "add", broken)
    for stream in (False, True):
        response = post(served["base"], {"model": "tiny", "messages": msg(), "stream": stream, "max_tokens": 4})
        error = check_error(response, 500)
        assert response.headers["x-request-id"] in error["message"]
    monkeypatch.undo()
    assert post(served["base"], {"model": "tiny", "messages": msg(), "max_tokens": 2}).status_code == 200


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event_and_done(served, monkeypatch):
    scheduler = scheduler_of(served["app"])
    real_step = scheduler.decoder.step

    def failing_step():  # the first step after the answer's first text was sent fails
        if any(job.answer.sent for job in scheduler.jobs.values()):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] 0x7f3a5c001234 /work/secret/path")
        return real_step()

    monkeypatch.setattr(scheduler.decoder, "step", failing_step)
    body = {"model": "tiny", "messages": msg(), "stream": True, "max_tokens": 64}
    with httpx.stream("POST", f"{served['base']}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        rid = response.headers["x-request-id"]
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    monkeypatch.undo()
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert rid in error["message"] and not LEAKS.search(events[-2]), events[-2]
    chunks = [json.loads(e) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text and all(c["choices"][0]["finish_reason"] is None for c in chunks)  # the answer had begun
    assert post(served["base"], {"model": "tiny", "messages": msg(), "max_tokens": 2}).status_code == 200
