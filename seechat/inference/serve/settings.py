"""What one request and the whole server may cost: `Limits`, each field a `seechat serve` option.

Light on purpose (no imports beyond the standard library): the command line builds its options
from these defaults without loading the server. The defaults are safe on a shared machine.
"""
from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * MiB  # a request body, images included (data URLs)
    max_images: int = 8  # image parts in one request, counted before any is decoded
    max_image_bytes: int = 10 * MiB  # one image, encoded
    max_image_pixels: int = 4096 * 4096  # one image, read from its header before decoding
    decode_workers: int = 2  # images decoded at once, over all requests
    max_new_tokens: int = 256  # the default answer length and the cap on max_tokens
    max_context: int | None = None  # prompt + answer tokens; None: the model's positions
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests admitted but not yet decoding; more get 429
    request_timeout: float = 300.0  # queued + generating; in the queue: 503, generating: the answer so far
    header_timeout: float = 10.0  # from connect (or the end of the previous answer) to a complete request head
    body_timeout: float = 30.0  # to receive the whole body once the head is in
    keep_alive_timeout: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # open connections; more are answered 503 and closed

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and not value > 0:
                raise ValueError(f"serve limit {name} must be positive, got {value!r}")
