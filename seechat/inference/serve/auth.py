"""Who may talk to the server: API keys, allowed Host headers, and the bind address check.

* Keys: `--api-key KEY` (repeatable) and `SEECHAT_API_KEY` (several separated by commas).
  With keys, every route but `/health` needs `Authorization: Bearer KEY`; each key is compared
  with `hmac.compare_digest` (all of them, whatever matches), otherwise 401 in OpenAI's format.
* Host: the `Host` header must name an allowed host (default: the loopback names), which stops
  DNS rebinding: a web page cannot make a browser talk to the server under another name.
* Binding a non-loopback address without a key is refused unless `--insecure-no-auth` says so,
  and then it warns.

This is a pure ASGI middleware, outermost: every response, errors included, carries the
request's id in `x-request-id`.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from typing import Iterable

from seechat.errors import UserError
from seechat.inference.serve.errors import APIError, error_response, new_request_id

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health",)
DOCS_PATHS = ("/docs", "/openapi.json", "/docs/oauth2-redirect")
log = logging.getLogger("seechat.serve")


def api_keys(given: Iterable[str] = (), environ: dict | None = None) -> tuple[str, ...]:
    """The keys from the command line and SEECHAT_API_KEY (comma-separated), empty ones dropped."""
    env = (environ if environ is not None else os.environ).get("SEECHAT_API_KEY", "")
    keys = [k.strip() for k in [*given, *env.split(",")] if k and k.strip()]
    return tuple(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: tuple[str, ...], insecure_no_auth: bool) -> None:
    """Refuse to serve a non-loopback address without a key unless explicitly told to."""
    if is_loopback(host) or keys:
        return
    if not insecure_no_auth:
        raise UserError(f"--host {host} is reachable from other machines and no API key is set: give "
                        "--api-key KEY (or SEECHAT_API_KEY), or --insecure-no-auth to serve anyone")
    log.warning("serving %s without authentication (--insecure-no-auth): anyone who can reach it can use it", host)


def host_name(header: str) -> str:
    """The host part of a Host header value: `[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def key_matches(header: str, keys: tuple[str, ...]) -> bool:
    scheme, _, token = header.partition(" ")
    token = token.strip().encode()
    matched = False
    for key in keys:  # every key compared, so the time does not tell which one is near
        matched |= hmac.compare_digest(token, key.encode())
    return matched and scheme.lower() == "bearer"


class Guard:
    """ASGI middleware: request id, Host check, API key check."""

    def __init__(self, app, keys: tuple[str, ...], allowed_hosts: Iterable[str], docs: bool):
        self.app, self.keys, self.docs = app, keys, docs
        self.allowed = {h.strip("[]").lower() for h in allowed_hosts}
        self.any_host = "*" in self.allowed

    def _refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.any_host and host_name(headers.get("host", "")) not in self.allowed:
            return APIError(400, "the Host header names a host this server does not answer to; start it with "
                                 "--allowed-host NAME", None, "invalid_host")
        authenticated = not self.keys or key_matches(headers.get("authorization", ""), self.keys)
        scope["state"]["authenticated"] = authenticated
        path = scope.get("path", "")
        if authenticated or path in OPEN_PATHS or (self.docs and path in DOCS_PATHS):
            return None
        if not authenticated:
            return APIError(401, "missing or incorrect API key; send it as 'Authorization: Bearer KEY'",
                            None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await error_response(refusal, rid)(scope, receive, send)
        await self.app(scope, receive, send_with_id)
