"""`seechat serve`: an OpenAI-compatible HTTP server for a saved model (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (messages with text and `image_url` content parts;
`stream: true` sends server-sent events in OpenAI's chunk format ending with `data: [DONE]`),
`GET /v1/models`, `GET /health`. Images are data URLs, or local paths (`file://...` or plain)
inside `image_dir` when one is given - a server must not read any file a client names. Remote
http(s) URLs are refused (seechat runs offline; send the bytes as a data URL). Answers are
greedy unless `temperature > 0`; `seed`, `top_p`, `top_k`, `stop` and `max_tokens` are per request.

The parts, one job each:
  routes.py     the application and its handlers (asynchronous: no thread waits per request)
  scheduler.py  one thread decodes all admitted requests as one batch (continuous batching)
  limits.py     what a request may cost (`Limits`, every one a command-line option) and the checks
  messages.py   OpenAI messages -> seechat turns; images checked before they are decoded
  auth.py       API keys, allowed Host headers, the non-loopback bind check
  protocol.py   the request-head time limit and the connection cap uvicorn lacks (public APIs)
  errors.py     every error in OpenAI's format, with a request id; nothing internal in a body
  settings.py, options.py   the limits and the command-line options (light: no server import)
See docs/serving.md (security: what is limited, the defaults, behind a proxy).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from seechat.inference.serve.settings import Limits

# The package imports nothing heavy itself (the command line reads settings.py and options.py
# through it); the server's modules load when these functions run.
__all__ = ["Limits", "create_app", "serve", "server_config"]


def create_app(*args: Any, **kwargs: Any):
    """The ASGI application serving a model: see `seechat.inference.serve.routes.create_app`."""
    from seechat.inference.serve.routes import create_app as build

    return build(*args, **kwargs)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, **uvicorn_kwargs):
    """The uvicorn configuration `seechat serve` runs `app` with (tests start servers from it too)."""
    import uvicorn

    from seechat.inference.serve.protocol import ConnectionLimits

    limits = limits or Limits()
    connections = ConnectionLimits(limits.header_timeout, limits.max_connections)
    # the limits' middleware applies uvicorn's proxy-headers middleware itself (inside it)
    app = connections.wrap(app, uvicorn_kwargs.pop("proxy_headers", True), uvicorn_kwargs.pop("forwarded_allow_ips", None))
    return uvicorn.Config(
        app, host=host, port=port, http=connections.protocol(), proxy_headers=False,
        timeout_keep_alive=max(1, round(limits.keep_alive_timeout)), timeout_graceful_shutdown=5,
        server_header=False, lifespan="on", **uvicorn_kwargs,
    )


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          image_dir: str | None = None, max_new_tokens: int = 256, *, limits: Limits | None = None,
          keys: tuple[str, ...] = (), insecure_no_auth: bool = False, allowed_hosts: tuple[str, ...] = (),
          docs: bool = False) -> None:
    """Load the saved model at `model_dir` and serve it until interrupted. `keys` are added to
    SEECHAT_API_KEY's; a non-loopback `host` needs a key or `insecure_no_auth`."""
    from seechat.inference.serve.auth import LOOPBACK_HOSTS, api_keys, check_exposure, is_loopback

    keys = api_keys(keys)
    check_exposure(host, keys, insecure_no_auth)  # before torch and the model load: a refusal is instant
    import uvicorn

    from seechat.inference.serve.routes import create_app as build
    from seechat.models.kinds import load

    limits = limits or Limits(max_new_tokens=max_new_tokens)
    hosts = tuple(allowed_hosts) or LOOPBACK_HOSTS + (() if is_loopback(host) or host in ("0.0.0.0", "::") else (host,))
    name = model_name or Path(model_dir).resolve().name
    app = build(load(model_dir), name, image_dir, limits=limits, api_keys=keys, allowed_hosts=hosts, docs=docs)
    print(f"seechat serve: {name} on http://{host}:{port} (Host headers accepted: {', '.join(hosts)}; "
          f"{'API key required' if keys else 'no API key'})", flush=True)
    uvicorn.Server(server_config(app, host, port, limits)).run()
