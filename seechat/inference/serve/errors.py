"""Errors in OpenAI's format (`{"error": {"message", "type", "param", "code"}}`), for every status.

A client sees what it did wrong and nothing of the server: no path, address or exception text.
Those go to the server log under the request id that the client also receives (the
`x-request-id` header, and inside the message of a 5xx), so an operator can find the cause.
"""
from __future__ import annotations

import logging
import secrets

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("seechat.serve")

TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """A request the server refuses: its HTTP status and what the client is told."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(err: APIError, request_id: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=headers)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install_handlers(app) -> None:
    """Every error the application can raise answered in OpenAI's format."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(APIError(400, message, param), request_id(request))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        path = request.url.path[:100]
        messages = {404: f"no route {path!r}; this server has /v1/chat/completions, /v1/models "
                         "and /health", 405: f"method {request.method} is not allowed on {path!r}"}
        message = messages.get(err.status_code, "the request was refused")
        return error_response(APIError(err.status_code, message, headers=dict(err.headers or {})),
                              request_id(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        rid = request_id(request) or new_request_id()
        log.error("request %s failed", rid, exc_info=err)
        return error_response(APIError(500, f"internal error (request id {rid}); the server log has the cause"), rid)
