"""`seechat serve`: the OpenAI-compatible server, driven with the official `openai` client."""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import seechat
from seechat.inference.serve import create_app, server_config
from vlm_helpers import saved_model, shape_image

PROMPT = "What color is the shape?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text, *urls):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


def wait_healthy(base: str, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {base} did not come up")


@pytest.fixture(scope="module")
def served(experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = saved_model(experts, root / "model")
    (root / "images").mkdir()
    shape_image().save(root / "images" / "red.png")
    model = seechat.load(model_dir)
    port = free_port()
    server = uvicorn.Server(server_config(create_app(model, "tiny", image_dir=root / "images"),
                                          port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    yield {"client": client, "base": base, "model": model, "root": root, "model_dir": model_dir}
    server.should_exit = True
    thread.join(timeout=10)


def test_plain_and_streamed_answers(served):
    client, model = served["client"], served["model"]
    image = shape_image()
    expected = model.chat(PROMPT, images=[image], max_new_tokens=8)
    reply = client.chat.completions.create(model="tiny", messages=[user(PROMPT, data_url(image))], max_tokens=8)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > model.num_image_tokens

    # a local path inside --image-dir gives the same answer
    local = client.chat.completions.create(model="tiny", max_tokens=8,
                                           messages=[user(PROMPT, str(served["root"] / "images" / "red.png"))])
    assert local.choices[0].message.content == expected

    stream = client.chat.completions.create(model="tiny", messages=[user(PROMPT, data_url(image))],
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1

    # the raw event stream ends with [DONE]
    body = {"model": "tiny", "messages": [user(PROMPT, data_url(image))], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{served['base']}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_multi_turn_and_models(served):
    client, model = served["client"], served["model"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    image = shape_image((30, 30, 200))
    first = model.chat(PROMPT, images=[image], max_new_tokens=6)
    messages = [user(PROMPT, data_url(image)), {"role": "assistant", "content": first}, user("Is it red?")]
    from seechat.models.prompting import reply as answer_turn

    turns = [{"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": first},
             {"from": "human", "value": "Is it red?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == answer_turn(model, turns, [image], 6).text


def test_bad_requests_are_4xx_json_and_server_keeps_serving(served):
    client, base = served["client"], served["base"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[user(PROMPT)])
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    assert "gpt-4o" in err.value.body["message"]

    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG definitely not an image").decode()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[user(PROMPT, broken)])
    assert "cannot read image" in err.value.body["message"]
    assert err.value.body["param"] == "messages[0].content[0]"

    outside = "/etc/hostname"
    with pytest.raises(openai.BadRequestError, match="outside the server's image directory"):
        client.chat.completions.create(model="tiny", messages=[user(PROMPT, outside)])

    with pytest.raises(openai.BadRequestError, match="at least one message"):
        client.chat.completions.create(model="tiny", messages=[])

    missing = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    not_json = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "error" in not_json.json()

    for bad, param in (({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                       ({"top_p": 0}, "top_p")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=[user(PROMPT)], **bad)
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="outside the server's image directory"):
        client.chat.completions.create(model="tiny", messages=[user(PROMPT, "../../etc/hostname")])
    many = [{"type": "image_url", "image_url": {"url": data_url(shape_image())}}] * 9 + [{"type": "text", "text": PROMPT}]
    with pytest.raises(openai.BadRequestError, match="more than 8 images in one request"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": many}])

    # still serving
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": "tiny"}
    ok = client.chat.completions.create(model="tiny", messages=[user("Name a color.")], max_tokens=4)
    assert ok.choices[0].message.content == served["model"].chat("Name a color.", max_new_tokens=4)


@pytest.mark.slow  # a fresh process imports torch and transformers: seconds alone, minutes on a busy machine
def test_serve_command_runs_the_server(served):
    """`seechat serve` as users start it: a separate process, the model name from the directory."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "seechat.cli", "serve", "--model", str(served["model_dir"]), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout=600, process=process)
        assert json.loads(httpx.get(f"{base}/v1/models").text)["data"][0]["id"] == "model"
        response = httpx.post(f"{base}/v1/chat/completions", json={
            "model": "model", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4})
        assert response.json()["choices"][0]["message"]["content"] == served["model"].chat("Name a color.", max_new_tokens=4)
    finally:
        process.terminate()
        process.wait(timeout=30)
