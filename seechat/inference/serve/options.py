"""`seechat serve`'s options: the limits (settings.py) and the access switches, with their defaults.

Light on purpose: the command line builds its parser from this module without loading the server.
"""
from __future__ import annotations

import argparse
from typing import Any

from seechat.errors import UserError
from seechat.inference.serve.settings import MiB, Limits

DEFAULTS = Limits()
# option -> (Limits field, type, scale from the option's unit to the field's, help)
LIMIT_OPTIONS: dict[str, tuple[str, type, float, str]] = {
    "--max-batch": ("max_batch", int, 1, "sequences decoded together; 1 = one request at a time (serial)"),
    "--max-queue": ("max_queue", int, 1, "requests waiting for a place in the batch; more are answered 429"),
    "--max-context": ("max_context", int, 1, "prompt + answer tokens (default: the model's positions)"),
    "--max-body-mb": ("max_body_bytes", float, MiB, "request body size, images included (413 over it)"),
    "--max-images": ("max_images", int, 1, "image parts in one request, counted before decoding"),
    "--max-image-mb": ("max_image_bytes", float, MiB, "one encoded image"),
    "--max-image-pixels": ("max_image_pixels", int, 1, "one image's width x height, read before decoding"),
    "--decode-workers": ("decode_workers", int, 1, "images decoded at once over all requests"),
    "--request-timeout": ("request_timeout", float, 1, "seconds a request may queue + generate (queued: 503; "
                                                       "generating: the answer so far)"),
    "--header-timeout": ("header_timeout", float, 1, "seconds for a request head to arrive (slow clients: 408)"),
    "--body-timeout": ("body_timeout", float, 1, "seconds for a request body to arrive (408)"),
    "--keep-alive-timeout": ("keep_alive_timeout", float, 1, "seconds an idle kept-alive connection stays open"),
    "--max-connections": ("max_connections", int, 1, "open connections; more are answered 503"),
}


def _default(field: str, scale: float) -> Any:
    value = getattr(DEFAULTS, field)
    return None if value is None else (value / scale if scale != 1 else value)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the directory's name)")
    p.add_argument("--image-dir", default=None, help="allow local image paths inside this directory")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                   help="answer length: the default and the cap on what a request may ask for")
    access = p.add_argument_group("access")
    access.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="accept 'Authorization: Bearer KEY' (repeat for several; also SEECHAT_API_KEY, "
                             "comma-separated); without any key every client is served")
    access.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --host without an API key (warns)")
    access.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host header value to answer (repeat; default: localhost, 127.0.0.1, ::1; '*': any)")
    access.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    limits = p.add_argument_group("limits (every request is checked against these before any expensive step)")
    for option, (field, kind, scale, text) in LIMIT_OPTIONS.items():
        default = _default(field, scale)
        shown = "" if default is None else f" (default: {default:,})" if kind is int else f" (default: {default:g})"
        limits.add_argument(option, type=kind, default=default, help=text + shown)


def limits_from(args: argparse.Namespace) -> Limits:
    values: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for option, (field, kind, scale, _) in LIMIT_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        values[field] = None if value is None else (int(value * scale) if field.endswith("bytes") else value)
    try:
        return Limits(**values)
    except ValueError as err:  # a limit of 0 or below
        raise UserError(f"seechat serve: {err}; give a positive value") from None
