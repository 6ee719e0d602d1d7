"""Text in, text out: prompts and images turned into model inputs, answers decoded and streamed.

`reply` is the one answer path: `SeeChatVLM.chat`, `Conversation.ask` (the `seechat chat`
REPL) and `seechat serve` all answer through it; `prepare`/`decode` are its batched form
(`seechat eval`). A user turn with images is written as one `<image>\\n` per image followed by
the text - the same text the exported llava-hf chat template renders (seechat/tools/export.py),
so both give the same prompt. Control tokens (`<|im_end|>`, `<|im_start|>`, ...) come only from
the chat template: a turn's text that spells one is tokenised as the characters it is
(`prompt_ids`), so a user cannot forge a system or assistant turn. The model is duck-typed here (`seechat.models.base` imports this
module): anything with `tokenizer`, `num_image_tokens`, `image_transform`, `device`, `generate`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from seechat.data import load_image, render_prompt
from seechat.data.tokenization import _expand_images, boundary_ids, check_tokenizer, stop_token_ids
from seechat.models.llm import IMAGE_TOKEN

ImageLike = Any  # a path, a PIL image, or raw-bytes dict as `seechat.data.load_image` takes


def user_text(prompt: str, n_images: int) -> str:
    """A user turn's text: its images' placeholders first, then the prompt."""
    return f"{IMAGE_TOKEN}\n" * n_images + prompt


class TextDeltas:
    """Incremental detokenisation for streaming: `push(token)` returns the text that became
    certain, `finish()` the rest. The pieces joined equal `decode(tokens).strip()`: leading
    whitespace is never sent, trailing whitespace and incomplete UTF-8 are held back."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: wait
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        return "" if text.endswith("\ufffd") else self._emit(text)

    def finish(self) -> str:
        return self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip())


def conversation_inputs(
    model: Any, turns: Sequence[dict[str, str]], images: Sequence[ImageLike]
) -> tuple[list[int], torch.Tensor | None]:
    """Prompt ids (placeholders expanded) and stacked pixels for a canonical conversation
    (`{"from", "value"}` turns) whose `<image>` markers refer to `images` in order."""
    n_markers = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if n_markers != len(images):
        raise ValueError(f"the conversation has {n_markers} {IMAGE_TOKEN} marker(s) but {len(images)} image(s)")
    ids = prompt_ids(model.tokenizer, turns, model.num_image_tokens)
    pixels = [model.image_transform(load_image(image)) for image in images]
    return ids, (torch.stack(pixels) if pixels else None)


# Stands in for each turn's text to find where the template puts it (private-use code points).
def _sentinel(i: int) -> str:
    return f"\ue000seechat-turn-{i}\ue001"


def _text_spans(turns: Sequence[dict[str, str]], tokenizer, text: str) -> list[tuple[int, int]] | None:
    """Where each turn's text lies in the rendered prompt `text`, or None when the template
    does not render the text verbatim (or trimmed) between text of its own."""
    marked = render_prompt([{**t, "value": _sentinel(i)} for i, t in enumerate(turns)], tokenizer)
    spans, pos, rest = [], 0, marked
    for i, turn in enumerate(turns):
        head, found, rest = rest.partition(_sentinel(i))
        if not found:  # only turns after the last human one are left out of a prompt
            if any(t["from"] == "human" for t in turns[i:]):
                return None
            break
        if not text.startswith(head, pos):
            return None
        pos += len(head)
        for value in (turn["value"], turn["value"].strip()):
            if text.startswith(value, pos):
                spans.append((pos, pos + len(value)))
                pos += len(value)
                break
        else:
            return None
    return spans if text[pos:] == rest else None


# `split_special_tokens` is a setting of the shared Rust tokenizer, switched for the call: two
# threads tokenising at once (the server's workers) would see each other's setting.
_TOKENIZING = threading.Lock()


def prompt_ids(tokenizer, turns: Sequence[dict[str, str]], num_image_tokens: int) -> list[int]:
    """Ids of the generation prompt for `turns`, each `<image>` expanded to `num_image_tokens`
    ids. A control token spelt inside a turn's text is tokenised as plain text (HF's
    `split_special_tokens`), so control tokens come from the template alone; `<image>` stays
    the image marker (its count is checked against the images). Thread-safe."""
    with _TOKENIZING:
        return _prompt_ids(tokenizer, turns, num_image_tokens)


def _prompt_ids(tokenizer, turns: Sequence[dict[str, str]], num_image_tokens: int) -> list[int]:
    image_id = check_tokenizer(tokenizer, IMAGE_TOKEN)
    text = render_prompt(list(turns), tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    control = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i != image_id}
    if control.isdisjoint(ids):
        safe = ids
    else:
        spans = _text_spans(turns, tokenizer, text)
        if spans is None:  # cannot tell the template's tokens from the text's: refuse rather than guess
            raise ValueError("a message spells a control token (e.g. <|im_end|>) and this chat template does "
                             "not render message text verbatim; remove the control token from the text")
        safe = []
        for token, (start, end) in zip(ids, offsets):
            if token in control and any(a <= start and end <= b for a, b in spans):
                safe += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            else:
                safe.append(token)
    last_human = max(i for i, t in enumerate(turns) if t["from"] == "human")
    n_markers = sum(t["value"].count(IMAGE_TOKEN) for t in turns[: last_human + 1])
    if safe.count(image_id) != n_markers:
        raise ValueError(f"the rendered prompt holds {safe.count(image_id)} {IMAGE_TOKEN} token(s) for "
                         f"{n_markers} marker(s); does the chat template add {IMAGE_TOKEN}?")
    expanded, _, _ = _expand_images(safe, [0] * len(safe), image_id, num_image_tokens, boundary_ids(tokenizer))
    return expanded


def prepare(
    model: Any, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]] | None = None
) -> dict[str, torch.Tensor | None]:
    """A left-padded batch for `model.generate(**batch)`: one single-turn prompt per row, with
    `images[i]` (a list, possibly empty) for row i."""
    images = images if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
    rows, pixels, counts = [], [], []
    for prompt, row_images in zip(prompts, images):
        if isinstance(row_images, (str, bytes)) or not isinstance(row_images, Sequence):
            raise ValueError(f"images for prompt {prompt!r} must be a list of images, got {type(row_images).__name__}")
        ids, px = conversation_inputs(model, [{"from": "human", "value": user_text(prompt, len(row_images))}], row_images)
        rows.append(ids)
        counts.append(len(row_images))
        if px is not None:
            pixels.append(px)
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    device = model.device
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "pixel_values": torch.cat(pixels).to(device) if pixels else None,
        "num_images": torch.tensor(counts, device=device),
    }


def decode(model: Any, tokens: torch.Tensor) -> list[str]:
    """Answers from `generate`'s new tokens, special tokens and surrounding space removed."""
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


@dataclass
class Reply:
    """A generated assistant turn: its text, token counts, and whether it ended on its own
    (end token) rather than at `max_new_tokens`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    stopped: bool


def reply(
    model: Any,
    turns: Sequence[dict[str, str]],
    images: Sequence[ImageLike] = (),
    max_new_tokens: int = 64,
    on_text: Callable[[str], None] | None = None,
    **sampling: Any,
) -> Reply:
    """The next assistant turn of a conversation; `on_text` receives it piece by piece."""
    ids, pixels = conversation_inputs(model, turns, images)
    device = model.device
    deltas = TextDeltas(model.tokenizer)
    pad = model.tokenizer.pad_token_id

    def on_token(token: torch.Tensor) -> None:
        value = int(token[0])
        if on_text is not None and value != pad:
            piece = deltas.push(value)
            if piece:
                on_text(piece)

    out = model.generate(
        torch.tensor([ids], device=device),
        pixel_values=None if pixels is None else pixels.to(device),
        num_images=torch.tensor([len(images)], device=device),
        max_new_tokens=max_new_tokens,
        on_token=on_token,
        **sampling,
    )
    text = decode(model, out)[0]
    if on_text is not None:
        rest = deltas.finish()
        if rest:
            on_text(rest)
    stopped = out.shape[1] < max_new_tokens or int(out[0, -1]) in stop_token_ids(model.tokenizer)
    return Reply(text, len(ids), out.shape[1], stopped)
