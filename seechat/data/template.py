"""Chat templating: a canonical conversation rendered with the tokenizer's own chat template,
plus the character spans the loss should see.

seechat never hard-codes a prompt format: the LM's tokenizer knows how it was trained to see a
conversation. To know which characters the assistant wrote, we render the conversation and
prefixes of it and compare them. For the k-th message, if it is an assistant turn,

    render(messages[:k], add_generation_prompt=True)       = the text before the model writes
    render(messages with message k's content as a marker)  = where its content lies in the whole
    render(messages[:k] + [message k as a marker])         = its end-of-turn text ("<|im_end|>\\n")

The generation prompt must be a prefix of the whole rendered text ("prefix-stable"); a template
that is not (e.g. one that writes something depending on the number of messages first) is
refused with `TemplateError` rather than trained on silently wrong labels, and so is one that
changes the content or writes nothing after it (the model could never learn to stop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from jinja2 import TemplateError as JinjaError
from transformers import PreTrainedTokenizerBase

from seechat.data.schema import SampleError
from seechat.errors import UserError

ROLE_TO_CHAT = {"human": "user", "gpt": "assistant", "system": "system"}

# Stands in for an assistant message's content to locate where the template puts it. Private-use
# code points: no real content contains them and no template rewrites them.
_SENTINEL = "\ue000seechat-content\ue001"


class TemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot be used to find assistant spans."""


@dataclass(frozen=True)
class AssistantSpan:
    """Character offsets in the rendered text of one assistant turn. The generation prompt ends
    at `start`; the content is `text[content_start:content_end]`; the end-of-turn text (e.g.
    "<|im_end|>\\n") runs from `content_end` to `turn_end`. Text between `start` and
    `content_start` (Llama-2's space before the answer) is template text that the model, not
    the prompt, has to write at inference."""

    start: int
    content_start: int
    content_end: int
    turn_end: int


@dataclass(frozen=True)
class RenderedConversation:
    text: str
    assistant_spans: list[AssistantSpan]


def to_chat_messages(conversations: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Canonical turns (`from`/`value`) as chat-template messages (`role`/`content`)."""
    try:
        return [{"role": ROLE_TO_CHAT[turn["from"]], "content": turn["value"]} for turn in conversations]
    except KeyError as err:
        raise ValueError(f"unknown role {err.args[0]!r}; valid roles: {', '.join(ROLE_TO_CHAT)}") from None


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool, sample_id: Any
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except JinjaError as err:
        # Templates call `raise_exception(...)` on conversations they refuse (e.g. roles that do
        # not alternate): a problem of this sample, not of the setup.
        raise SampleError(sample_id, f"the chat template rejected this conversation: {err}") from err
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _not_prefix(what: str, index: int) -> TemplateError:
    return TemplateError(
        f"the tokenizer's chat template is not prefix-stable: {what} (assistant message {index}). "
        "seechat finds the assistant spans by rendering conversation prefixes; use a template "
        "that renders earlier turns the same way whatever follows them."
    )


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _assistant_span(tokenizer, messages, index: int, text: str, sample_id: Any) -> AssistantSpan:
    """Where assistant message `index` lies in `text` (the whole conversation rendered)."""
    before = _render(tokenizer, messages[:index], True, sample_id)
    if not text.startswith(before):
        raise _not_prefix("the generation prompt is not a prefix of the rendered conversation", index)
    marker = {"role": "assistant", "content": _SENTINEL}
    marked = _render(tokenizer, messages[:index] + [marker] + messages[index + 1 :], False, sample_id)
    if not marked.startswith(before) or marked.count(_SENTINEL) != 1:
        raise _not_prefix("the assistant content is not rendered once after the generation prompt", index)
    head, tail = marked[len(before) :].split(_SENTINEL)
    start, end = len(before) + len(head), len(text) - len(tail)
    if not (text[len(before) : start] == head and text.endswith(tail) and start <= end):
        raise _not_prefix("the text around the assistant content depends on the content", index)
    # Templates may trim the content (`| trim`); anything else would train on text the data
    # does not contain.
    if text[start:end].strip() != messages[index]["content"].strip():
        raise TemplateError(
            f"the chat template changes assistant message {index}'s content "
            f"({messages[index]['content']!r} is rendered as {text[start:end]!r})"
        )
    # The end-of-turn text: what the template writes after the content when this turn is the
    # last one (what the model writes before it stops), as far as the whole text has it too.
    last = _render(tokenizer, messages[:index] + [marker], False, sample_id).split(_SENTINEL)[-1]
    turn_end = end + _common_prefix(last, text[end:])
    if not text[end:turn_end].strip():
        raise TemplateError(
            f"the chat template writes no end-of-turn text after assistant message {index} "
            f"(it renders {last!r}); without an end token the model never learns to stop"
        )
    return AssistantSpan(len(before), start, end, turn_end)


def render_conversation(
    conversations: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, sample_id: Any = None
) -> RenderedConversation:
    """The full conversation rendered by the tokenizer's chat template, and the span of every
    assistant turn's content and end-of-turn text within it.

    Each assistant turn is located in the whole rendered text: its generation prompt must be a
    prefix of it, and the turn's content is found by rendering the conversation with a marker in
    its place. Templates that render history differently from the last turn (Qwen3 drops the
    `<think>` block from turns before the last user message) are fine: each span is what the
    whole text holds."""
    messages = to_chat_messages(conversations)
    text = _render(tokenizer, messages, False, sample_id)
    spans = [_assistant_span(tokenizer, messages, index, text, sample_id)
             for index, message in enumerate(messages) if message["role"] == "assistant"]
    return RenderedConversation(text, spans)


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes after an assistant answer ("<|im_end|>\\n", " </s>", ...)."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    return _render(tokenizer, messages, False, None).split(_SENTINEL)[-1]


def render_prompt(conversations: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt for generating the next assistant turn: all turns up to and including the
    last human turn, followed by the template's generation prompt."""
    last_human = max((i for i, turn in enumerate(conversations) if turn["from"] == "human"), default=None)
    if last_human is None:
        raise ValueError("a prompt needs at least one 'human' turn")
    messages = to_chat_messages(conversations[: last_human + 1])
    return _render(tokenizer, messages, True, None)
