"""`seechat chat`: one question about some images, or an interactive session (REPL).

In the REPL a line is a question; the answer streams as it is generated. Commands:
`/image PATH` attaches an image to the next question (repeat for several), `/reset` forgets the
conversation and its images, `/help`, `/quit` (or end of input). Earlier turns and images stay
in the conversation, so follow-up questions can refer to them.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence, TextIO

from seechat.inference.conversation import Conversation
from seechat.data import SampleError
from seechat.models.base import SeeChatVLM

HELP = "commands: /image PATH (attach to the next question), /reset, /help, /quit"


def one_shot(model: SeeChatVLM, question: str, images: Sequence[Any], out: TextIO | None = None,
             max_new_tokens: int = 64, images_dir: str | None = None) -> str:
    """Answer one question, streaming the answer to `out` (default: the current stdout). With
    `images_dir`, a native model's reply may hold images, written there (inference/draw.py)."""
    out = out or sys.stdout
    if images_dir is not None:
        from seechat.inference.draw import reply_with_images

        answer = reply_with_images(model, question, images, images_dir, max_new_tokens=max_new_tokens)[0]
        _write(out, answer + "\n")
        return answer
    answer = model.chat(question, images=list(images), max_new_tokens=max_new_tokens,
                        on_text=lambda piece: _write(out, piece))
    _write(out, "\n")
    return answer


def repl(model: SeeChatVLM, images: Sequence[Any] = (), read: Callable[[str], str] = input,
         out: TextIO | None = None, max_new_tokens: int = 64) -> int:
    """Run the interactive session until /quit or end of input; `images` attach to the first
    question. `read` is `input` (tests pass a fake); `out` defaults to the current stdout."""
    out = out or sys.stdout
    conversation = Conversation(model)
    for image in images:
        conversation.add_image(image)
    _write(out, HELP + "\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            _write(out, "\n")
            return 0
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            _write(out, HELP + "\n")
        elif command == "/reset":
            conversation.reset()
            _write(out, "(conversation cleared)\n")
        elif command == "/image":
            try:
                conversation.add_image(argument.strip())
            except SampleError as err:  # names the file and what is wrong with it
                _write(out, f"error: {err.file or argument.strip()}: {err.problem}\n")
                continue
            _write(out, f"(image {argument.strip()} attached to the next question)\n")
        elif command.startswith("/"):
            _write(out, f"unknown command {command}; {HELP}\n")
        else:
            _write(out, "model> ")
            try:
                conversation.ask(line, max_new_tokens, on_text=lambda piece: _write(out, piece))
            except ValueError as err:  # e.g. a literal <image> in the text, a prompt too long
                _write(out, f"error: {err}")
            _write(out, "\n")


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()
