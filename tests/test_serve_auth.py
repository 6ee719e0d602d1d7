"""Authentication and exposure: API keys as Bearer tokens (401 in OpenAI's format otherwise),
allowed Host headers, no /docs unless asked, and no unauthenticated non-loopback bind."""
from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import openai
import pytest

import seechat
from seechat.errors import UserError
from seechat.inference.serve.auth import api_keys, check_exposure, host_name, key_matches
from serve_helpers import running, user
from vlm_helpers import saved_model


@pytest.fixture(scope="module")
def model(experts, tmp_path_factory):
    return seechat.load(saved_model(experts, tmp_path_factory.mktemp("auth") / "model"))


def test_api_keys_are_required_as_bearer_tokens(model):
    with running(model, api_keys=("key-one", "key-two")) as (base, _):
        body = {"model": "tiny", "messages": [user("red")], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"},
                        {"Authorization": "Basic key-one"}, {"Authorization": "Bearer key-one-and-more"}):
            refused = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert refused.json()["error"]["type"] == "authentication_error"
            assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        for key in ("key-one", "key-two"):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            assert client.chat.completions.create(model="tiny", messages=[user("red")], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
        # /health stays open for probes, without naming the model to strangers
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}
        assert httpx.get(f"{base}/health", headers={"Authorization": "Bearer key-two"}).json() == {
            "status": "ok", "model": "tiny"}


def test_keys_from_the_environment_and_the_constant_time_compare():
    assert api_keys(["a"], {"SEECHAT_API_KEY": "b, c,,a"}) == ("a", "b", "c")
    assert api_keys([], {}) == ()
    assert key_matches("Bearer b", ("a", "b")) and key_matches("bearer b", ("b",))
    assert not key_matches("Bearer ", ("a",)) and not key_matches("Bearer ab", ("a",))


def test_host_headers_outside_the_allowed_names_are_refused(model):
    with running(model) as (base, _):  # default: loopback names only
        for host in ("localhost:8000", "127.0.0.1", "[::1]:1234"):
            assert httpx.get(f"{base}/v1/models", headers={"Host": host}).status_code == 200, host
        rebound = httpx.get(f"{base}/v1/models", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    with running(model, allowed_hosts=("models.internal",)) as (base, _):
        assert httpx.get(f"{base}/v1/models", headers={"Host": "models.internal"}).status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 400
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM:80") == "example.com"


def test_docs_are_off_unless_asked(model):
    with running(model) as (base, _):
        for path in ("/docs", "/openapi.json", "/redoc"):
            response = httpx.get(f"{base}{path}")
            assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    with running(model, docs=True, api_keys=("k",)) as (base, _):
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "seechat"
        assert httpx.get(f"{base}/docs").status_code == 200


def test_a_non_loopback_bind_needs_a_key_or_an_explicit_insecure_flag(caplog, experts, tmp_path):
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, (), False)
    check_exposure("0.0.0.0", ("k",), False)
    with pytest.raises(UserError, match="--api-key"):
        check_exposure("0.0.0.0", (), False)
    with caplog.at_level(logging.WARNING, logger="seechat.serve"):
        check_exposure("192.168.1.5", (), True)
    assert "without authentication" in caplog.text
    # the command ends in one line, exit status 2, before any model is loaded
    model_dir = saved_model(experts, tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "seechat.cli", "serve", "--model", str(model_dir), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120, env={"SEECHAT_API_KEY": "", "PATH": ""})
    assert proc.returncode == 2 and "--insecure-no-auth" in proc.stderr and "Traceback" not in proc.stderr
