"""Bounded work per request: every limit is checked before the expensive step it protects, a
full queue answers 429, time limits close slow or idle clients, and a client that leaves
stops its request and frees its place."""
from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import httpx
import pytest

import seechat
import seechat.inference.serve.messages as messages_module
import seechat.inference.serve.routes as routes_module
from seechat.inference.serve.settings import Limits
from serve_helpers import Gate, data_url, running, scheduler_of, user, wait_for
from vlm_helpers import saved_model, shape_image


@pytest.fixture(scope="module")
def model(experts, tmp_path_factory):
    return seechat.load(saved_model(experts, tmp_path_factory.mktemp("limits") / "model"))


def ask(base, messages, **extra):
    return httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": messages, **extra}, timeout=60)


def assert_openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_body_over_the_cap_is_413_declared_or_streamed(model):
    with running(model, Limits(max_body_bytes=4096)) as (base, _):
        big = [user("x" * 5000)]
        assert_openai_error(ask(base, big), 413, "request_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'
        response = httpx.post(f"{base}/v1/chat/completions", content=chunks(), timeout=30)
        assert_openai_error(response, 413, "request_too_large")
        assert ask(base, [user("red")], max_tokens=2).status_code == 200


def test_image_parts_are_counted_before_any_is_decoded_and_decoding_is_bounded(model, monkeypatch):
    real, state = messages_module.load_image, {"calls": 0, "now": 0, "most": 0}
    lock = threading.Lock()

    def counting(*args, **kwargs):
        with lock:
            state["calls"] += 1
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(messages_module, "load_image", counting)
    url = data_url(shape_image())
    with running(model, Limits(max_images=3, decode_workers=1)) as (base, _):
        error = assert_openai_error(ask(base, [user("red", *[url] * 4)]), 400)
        assert "more than 3 images" in error["message"] and state["calls"] == 0
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: ask(base, [user("red", url, url)], max_tokens=2), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert state["calls"] == 8 and state["most"] == 1


def test_prompt_and_answer_must_fit_the_context_checked_before_decoding(model, monkeypatch):
    tokenised = []
    real = routes_module.prompt_ids
    monkeypatch.setattr(routes_module, "prompt_ids", lambda *a: tokenised.append(1) or real(*a))
    with running(model, Limits(max_context=48, max_new_tokens=8)) as (base, _):
        n = len(real(model.tokenizer, [{"from": "human", "value": "red " * 10}], model.num_image_tokens))
        error = assert_openai_error(ask(base, [user("red " * 10)], max_tokens=48 - n + 1), 400,
                                    "context_length_exceeded")
        assert f"prompt is {n} tokens and max_tokens is {48 - n + 1}" in error["message"]
        assert "context of 48 tokens" in error["message"] and error["param"] == "max_tokens"
        fits = ask(base, [user("red " * 10)], max_tokens=48 - n)  # fits; the server's cap of 8 applies
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] <= 8
        long = assert_openai_error(ask(base, [user("red " * 40)]), 400, "context_length_exceeded")
        assert "context of 48 tokens" in long["message"]
        before = len(tokenised)
        assert_openai_error(ask(base, [user("x" * (48 * 32 + 1))]), 400, "context_length_exceeded")
        assert_openai_error(ask(base, [user("a")] * 60), 400, "context_length_exceeded")
        assert len(tokenised) == before  # refused before tokenising


def test_a_full_queue_answers_429_with_retry_after(model):
    gate = Gate(model)
    try:
        with running(model, Limits(max_batch=1, max_queue=2)) as (base, app):
            gate.close()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                first = pool.submit(ask, base, [user("red")], max_tokens=3)
                assert gate.entered.wait(20)  # the first request is decoding (held in its step)
                queued = [pool.submit(ask, base, [user("blue")], max_tokens=3) for _ in range(2)]
                wait_for(lambda: scheduler_of(app).load()["waiting"] == 2, what="two queued requests")
                refused = ask(base, [user("green")], max_tokens=3)
                assert_openai_error(refused, 429, "server_busy")
                assert refused.headers["retry-after"] == "1"
                assert httpx.get(f"{base}/health", timeout=5).status_code == 200  # the loop is free meanwhile
                gate.release()
                assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
    finally:
        gate.remove()


def test_abandoned_requests_stop_and_free_their_place(model):
    gate = Gate(model)
    jobs = []
    try:
        with running(model, Limits(max_batch=1, max_queue=4)) as (base, app):
            scheduler = scheduler_of(app)
            real_submit = scheduler.submit
            scheduler.submit = lambda *a, **k: jobs.append(real_submit(*a, **k)) or jobs[-1]
            gate.close()
            body = {"model": "tiny", "messages": [user("red")], "max_tokens": 200}
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                # generating, not streamed: the client gives up after 1 s
                pool.submit(lambda: httpx.post(f"{base}/v1/chat/completions", json=body, timeout=1.0))
                assert gate.entered.wait(20)
                # queued: its client gives up too
                pool.submit(lambda: httpx.post(f"{base}/v1/chat/completions", json=body, timeout=1.0))
                wait_for(lambda: scheduler.load()["waiting"] == 1, what="a queued request")
                wait_for(lambda: scheduler.load()["waiting"] == 0, what="the queued request to leave")
                time.sleep(0.5)
                gate.release()
                wait_for(lambda: scheduler.load()["decoding"] == 0, what="the decoding request to stop")
            generating, queued = jobs
            assert generating.seq.finish == "cancelled" and len(generating.seq.tokens) < 10
            assert queued.seq.tokens == []
            # streamed: the client reads two events and leaves
            with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as response:
                lines = response.iter_lines()
                next(lines), next(lines)
            wait_for(lambda: jobs[-1].seq.finish is not None, what="the stream's request to stop")
            assert jobs[-1].seq.finish == "cancelled" and len(jobs[-1].seq.tokens) < 200
            assert ask(base, [user("red")], max_tokens=2).status_code == 200
    finally:
        gate.remove()


def test_request_timeout_answers_503_in_the_queue_and_ends_a_running_answer(model):
    gate = Gate(model)
    try:
        with running(model, Limits(max_batch=1, request_timeout=1.0)) as (base, app):
            gate.close()
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                running_one = pool.submit(ask, base, [user("red")], max_tokens=200)
                assert gate.entered.wait(20)
                start = time.time()
                queued = ask(base, [user("blue")], max_tokens=3)
                assert_openai_error(queued, 503, "timeout")
                assert queued.headers["retry-after"] == "1" and time.time() - start < 5
                gate.release()
                answer = running_one.result()
            assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
            assert answer.json()["usage"]["completion_tokens"] < 200
    finally:
        gate.remove()


def _raw(base):
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _trickle(sock, start: bytes) -> None:
    """Send `start`, then one more header byte every 0.1 s (for 5 s, or until the server closes)."""
    sock.sendall(start)
    try:
        for _ in range(50):
            sock.sendall(b"X")
            time.sleep(0.1)
    except OSError:
        pass


def test_slow_heads_slow_bodies_and_idle_connections_are_closed(model):
    limits = Limits(header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=1.0)
    with running(model, limits) as (base, _):
        start = time.time()
        with _raw(base) as idle:  # connects and sends nothing
            assert _read_all(idle).startswith(b"HTTP/1.1 408")
        with _raw(base) as slow:  # slowloris: one header byte every 0.1 s
            _trickle(slow, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
            assert _read_all(slow).startswith(b"HTTP/1.1 408")
        assert time.time() - start < 4
        with _raw(base) as body:  # the head is in, the body never completes
            body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\"")
            reply = _read_all(body)
            assert reply.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in reply.replace(b" ", b"")
        with _raw(base) as kept:  # an answer, then idle: closed after keep_alive_timeout
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            start = time.time()
            assert b"200 OK" in _read_all(kept)
            assert time.time() - start < 4


def test_connections_over_the_cap_get_503(model):
    with running(model, Limits(max_connections=2, header_timeout=5)) as (base, _):
        held = [_raw(base), _raw(base)]
        try:
            time.sleep(0.2)
            with _raw(base) as third:
                reply = _read_all(third)
            assert reply.startswith(b"HTTP/1.1 503") and b"server_busy" in reply
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, what="a free connection")


def test_the_next_head_on_a_kept_alive_connection_is_timed_too(model):
    with running(model, Limits(header_timeout=0.5, keep_alive_timeout=5.0)) as (base, _):
        with _raw(base) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            first = b""
            while b'"ok"' not in first:
                first += kept.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            start = time.time()
            _trickle(kept, b"GET /health HTTP/1.1\r\n")
            assert _read_all(kept).startswith(b"HTTP/1.1 408")
            assert time.time() - start < 4
