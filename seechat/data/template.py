"""Chat templating: a canonical conversation rendered with the tokenizer's own chat template,
plus the character spans the loss should see.

seechat never hard-codes a prompt format: the LM's tokenizer knows how it was trained to see a
conversation. To know which characters the assistant wrote, we render growing prefixes of the
conversation and compare them. For the k-th message, if it is an assistant turn,

    render(messages[:k], add_generation_prompt=True)   = everything before its content
    render(messages[:k+1])                               = ... + its content + end-of-turn text

which holds for every template that renders earlier turns the same way regardless of what
follows ("prefix-stable"). Templates that are not (e.g. ones that rewrite earlier assistant
turns) are detected and refused with `TemplateError` rather than trained on silently wrong labels.
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


def render_conversation(
    conversations: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, sample_id: Any = None
) -> RenderedConversation:
    """The full conversation rendered by the tokenizer's chat template, and the span of every
    assistant turn's content and end-of-turn text within it."""
    messages = to_chat_messages(conversations)
    text = _render(tokenizer, messages, False, sample_id)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True, sample_id)
        through = _render(tokenizer, messages[: index + 1], False, sample_id)
        placeholder = _render(
            tokenizer, messages[:index] + [{"role": "assistant", "content": _SENTINEL}], False, sample_id
        )
        if not through.startswith(before):
            raise _not_prefix("the generation prompt is not a prefix of the rendered assistant turn", index)
        if not text.startswith(through):
            raise _not_prefix("a rendered prefix of the conversation is not a prefix of the whole", index)
        if not placeholder.startswith(before) or placeholder.count(_SENTINEL) != 1:
            raise _not_prefix("the assistant content is not rendered once after the generation prompt", index)
        head, tail = placeholder[len(before) :].split(_SENTINEL)
        start, end = len(before) + len(head), len(through) - len(tail)
        if not (through[len(before) : start] == head and through.endswith(tail) and start <= end):
            raise _not_prefix("the text around the assistant content depends on the content", index)
        # Templates may trim the content (`| trim`); anything else would train on text the data
        # does not contain.
        if through[start:end].strip() != message["content"].strip():
            raise TemplateError(
                f"the chat template changes assistant message {index}'s content "
                f"({message['content']!r} is rendered as {through[start:end]!r})"
            )
        spans.append(AssistantSpan(len(before), start, end, len(through)))
    return RenderedConversation(text, spans)


def render_prompt(conversations: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt for generating the next assistant turn: all turns up to and including the
    last human turn, followed by the template's generation prompt."""
    last_human = max((i for i, turn in enumerate(conversations) if turn["from"] == "human"), default=None)
    if last_human is None:
        raise ValueError("a prompt needs at least one 'human' turn")
    messages = to_chat_messages(conversations[: last_human + 1])
    return _render(tokenizer, messages, True, None)
