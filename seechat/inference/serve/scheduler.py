"""The scheduler: one thread that owns the model and decodes every admitted request in one batch.

Requests join the running batch at the next step and leave it when they finish
(seechat/models/decoding.py), so a short answer never waits for a long one and throughput grows
with the number of clients. The queue is bounded: `reserve` refuses a place when `max_queue`
requests are already waiting (the route answers 429). A request whose client has gone
(`cancel`), queued or decoding, stops taking work at the next step and frees its place. Past
its deadline a queued request is answered 503, a decoding one ends with what it has
(finish_reason "length"). Events reach the request's asyncio queue through its event loop.

`max_batch=1` decodes one request at a time: the serial server, kept to measure against.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from seechat.inference.serve.errors import APIError, log
from seechat.models.decoding import BatchDecoder, Sampling, Sequence
from seechat.models.prompting import TextDeltas


class AnswerText:
    """The answer's text as tokens arrive: pieces safe to send, with stop strings cut off.
    Text that could be the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stops: list[str]):
        self.deltas = TextDeltas(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stopped = False

    def _cut(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def push(self, token: int) -> str:
        self.text += self.deltas.push(token)
        self._cut()
        end = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.deltas.finish()
            self._cut()
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(eq=False)
class Job:
    """One request in the scheduler: its sequence, its text, where its events go."""

    seq: Sequence
    answer: AnswerText
    loop: asyncio.AbstractEventLoop
    deadline: float
    request_id: str
    events: deque = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    timed_out: bool = False
    streaming: bool = True

    def send(self, kind: str, value: Any) -> None:
        """From the scheduler thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self._put, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def _put(self, event: tuple[str, Any]) -> None:
        self.events.append(event)
        self.ready.set()

    async def next(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next event, or None after `timeout` seconds without one. (Waiting on an Event,
        not a queue's get: a wait cut short by the timeout can lose nothing.)"""
        if not self.events:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except TimeoutError:
                return None
        return self.events.popleft()

    def finish(self) -> None:
        if self.seq.on_token is None:  # nothing was followed token by token
            self.answer.deltas.tokens = list(self.seq.tokens)
        piece = self.answer.finish()
        if piece and self.streaming:
            self.send("text", piece)
        reason = "length" if self.timed_out or self.seq.finish == "length" else "stop"
        self.send("done", Result(self.answer.text, len(self.seq.ids), len(self.seq.tokens), reason))


class Scheduler:
    def __init__(self, model: Any, max_batch: int, max_queue: int):
        self.model = model
        self.decoder = BatchDecoder(model, max_batch)
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self.jobs: dict[Sequence, Job] = {}  # decoding
        self.reserved = 0
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="seechat-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ called from the event loop
    def reserve(self) -> None:
        """A place in the queue for a request that is still being prepared; 429 when full."""
        with self.condition:
            if len(self.waiting) + self.reserved >= self.max_queue:
                raise APIError(429, f"the server is busy ({self.max_queue} requests waiting); retry shortly",
                               None, "server_busy", headers={"Retry-After": "1"})
            self.reserved += 1

    def release(self) -> None:
        with self.condition:
            self.reserved -= 1

    def submit(self, ids: list[int], pixels: torch.Tensor | None, max_new_tokens: int, sampling: Sampling,
               stops: list[str], timeout: float, request_id: str, streaming: bool = True,
               features: torch.Tensor | None = None) -> Job:
        """Queue a prepared request (its place was reserved); its events arrive on `job.events`.
        `features`: its images' encoder outputs, computed already (then `pixels` is not needed)."""
        answer = AnswerText(self.model.tokenizer, stops)
        seq = Sequence(ids, None if features is not None else pixels, max_new_tokens, sampling, features=features)
        job = Job(seq, answer, asyncio.get_running_loop(), time.monotonic() + timeout, request_id, streaming=streaming)

        def on_token(token: int) -> bool:
            piece = answer.push(token)
            if piece and streaming:  # a whole answer needs no pieces: one event at the end
                job.send("text", piece)
            return answer.stopped

        if streaming or stops:  # otherwise the text is decoded once, at the end
            seq.on_token = on_token
        with self.condition:
            self.reserved -= 1
            self.waiting.append(job)
            self.condition.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client has gone: stop at the next step (or leave the queue)."""
        job.seq.cancelled = True
        with self.condition:
            if job in self.waiting:  # its place is free at once
                self.waiting.remove(job)
            self.condition.notify()

    def expire(self, job: Job) -> None:
        """The job's deadline has passed (the route keeps time, so a busy step cannot delay it):
        a queued job leaves with a 503, a decoding one ends at the next step with what it has."""
        with self.condition:
            queued = job in self.waiting
            if queued:
                self.waiting.remove(job)
            else:
                job.timed_out = job.seq.cancelled = True
        if queued:
            job.send("error", APIError(503, "the request waited too long in the queue; retry shortly", None,
                                       "timeout", headers={"Retry-After": "1"}))

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout=10)

    def load(self) -> dict[str, int]:
        with self.condition:
            return {"waiting": len(self.waiting) + self.reserved, "decoding": len(self.jobs)}

    # ------------------------------------------------------------------ the scheduler thread
    def _admit(self) -> list[Job]:
        """Under the lock: drop cancelled or expired waiting jobs, take what fits the batch."""
        now = time.monotonic()
        for job in list(self.waiting):
            if job.seq.cancelled:
                self.waiting.remove(job)
            elif now > job.deadline:
                self.waiting.remove(job)
                job.send("error", APIError(503, "the request waited too long in the queue; retry shortly",
                                           None, "timeout", headers={"Retry-After": "1"}))
        free = self.decoder.free
        return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and not self.jobs:
                    self.condition.wait()
                if self.stopping:
                    return
                joining = self._admit()
            now = time.monotonic()
            for job in self.jobs.values():
                if now > job.deadline and not job.seq.cancelled:
                    job.timed_out = job.seq.cancelled = True
            self.jobs.update((job.seq, job) for job in joining)
            try:  # newcomers are prefilled, then every row (newcomers too) takes a step
                finished = self.decoder.add([j.seq for j in joining]) if joining else []
                finished += self.decoder.step()
            except Exception as err:  # a failed step fails its batch, not the server
                self._fail(err)
                continue
            for seq in finished:
                job = self.jobs.pop(seq)
                try:
                    if seq.finish != "cancelled" or job.timed_out:
                        job.finish()
                except Exception as err:  # one answer that cannot be finished fails alone
                    log.error("request %s: finishing the answer failed", job.request_id, exc_info=err)
                    job.send("error", APIError(500, f"internal error (request id {job.request_id}); the server "
                                                    "log has the cause"))

    def _fail(self, err: Exception) -> None:
        ids = ", ".join(job.request_id for job in self.jobs.values())
        log.error("a decoding step failed (requests %s)", ids, exc_info=err)
        for job in self.jobs.values():
            job.send("error", APIError(500, f"internal error (request id {job.request_id}); the server log has "
                                            "the cause"))
        self.jobs.clear()
        self.decoder.cancel_all()
