"""Token ids and labels for one canonical sample, with each `<image>` expanded in place.

The rendered conversation (see `template.py`) is tokenized once, with character offsets, and a
token is supervised when it overlaps what the model has to write in an assistant turn: from the
end of the generation prompt (usually the content's first character; Llama-2 templates put a
space first) to the end of the content, then the end-of-turn text up to and including its first
special token - the end token (`<|im_end|>`, `</s>`, `<end_of_turn>`, `<|eot_id|>`, ...) - so
the model learns to stop; Llama-2's `' ' + eos` after the answer is two tokens, both supervised.
Nothing after the end token is (ChatML's "\\n"). Everything else is -100. Each `<image>` then
becomes exactly `num_image_tokens` copies, the number of embeddings the adapter produces, so
sequence lengths are final here and the model only has to fill the placeholders.

(Named tokenization.py, not tokenize.py, so that running a script from this folder cannot
shadow the standard library's `tokenize` module.)
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from seechat.data.schema import SampleError
from seechat.data.template import AssistantSpan, end_of_turn_text, render_conversation, render_prompt

IGNORE_INDEX = -100

Truncation = Literal["drop", "raise"]


class TruncationError(SampleError):
    """The sample is longer than `max_length` and cannot be cut without losing an image or all
    of its supervised tokens."""


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>") -> int:
    """Check that `tokenizer` can be used for VLM data and return the id of `image_token`."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; seechat needs a fast one (character "
            "offsets locate the assistant turns). Load it with AutoTokenizer(..., use_fast=True)."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; seechat renders conversations with it")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    # Between letters, to catch a token the tokenizer would merge with its neighbours.
    probe = tokenizer(f"a{image_token}a", add_special_tokens=False)["input_ids"]
    if image_id is None or image_id == tokenizer.unk_token_id or probe.count(image_id) != 1:
        raise ValueError(
            f"{image_token!r} is not a single token of this tokenizer; add it with "
            f"tokenizer.add_tokens([{image_token!r}], special_tokens=True) (seechat.models.llm.load_tokenizer "
            "does) and resize the LM's embeddings"
        )
    return image_id


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens (eos, bos, ... and added tokens marked special)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids generation stops at: eos, and the end token the chat template writes after an
    answer when that is another token (Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`)."""
    stops = {tokenizer.eos_token_id} - {None}
    if getattr(tokenizer, "chat_template", None):
        try:
            tail = tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
        except (SampleError, ValueError):  # a template that refuses the probe: eos alone
            tail = []
        special = special_ids(tokenizer)
        stops |= set(next(([t] for t in tail if t in special), []))
    return sorted(stops)


def _supervised_mask(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[AssistantSpan], ends: set[int]
) -> list[bool]:
    mask = [False] * len(offsets)
    i = 0
    for span in spans:  # spans and tokens are both in text order: one sweep
        # Supervision starts where the generation prompt ends, not at the content: whatever
        # lies between them is not in the prompt at inference, so the model must produce it.
        while i < len(offsets) and offsets[i][1] <= span.start:
            i += 1
        # Overlap rather than containment: a token that straddles a boundary still carries text
        # the model has to produce.
        while i < len(offsets) and offsets[i][0] < span.content_end:
            mask[i] = offsets[i][1] > offsets[i][0]
            i += 1
        # The end-of-turn text up to and including its end token (a special token); text after
        # it (ChatML's "\\n") is not. Without a special token, the whole end-of-turn text is.
        while i < len(offsets) and offsets[i][0] < span.turn_end:
            mask[i] = True
            i += 1
            if ids[i - 1] in ends:
                break
    return mask


def _count_markers(conversations: Sequence[Mapping[str, str]], image_token: str) -> int:
    return sum(turn["value"].count(image_token) for turn in conversations)


IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"


def boundary_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int] | None:
    """Ids of the image boundary tokens when the tokenizer has them. `seechat.models.llm` adds them
    only when the recipe sets `llm.image_boundary_tokens`, and a saved model's tokenizer keeps
    them, so the tokenizer is the one record of whether images are wrapped."""
    vocab = tokenizer.get_added_vocab()  # small, unlike get_vocab(): this runs per sample
    if IMAGE_START in vocab and IMAGE_END in vocab:
        return vocab[IMAGE_START], vocab[IMAGE_END]
    return None


def _expand_images(
    ids: Sequence[int], labels: Sequence[int], image_id: int, num_image_tokens: int,
    boundary: tuple[int, int] | None = None,
) -> tuple[list[int], list[int], int]:
    """ids/labels with every image id repeated `num_image_tokens` times (wrapped in `boundary`
    tokens if given), and the position just after the last image run (0 without images)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    last_image_end = 0
    for token, label in zip(ids, labels):
        if token == image_id:
            run = [image_id] * num_image_tokens
            if boundary:
                run = [boundary[0], *run, boundary[1]]
            out_ids.extend(run)
            out_labels.extend([IGNORE_INDEX] * len(run))
            last_image_end = len(out_ids)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels, last_image_end


def _check_image_count(
    sample_id: Any, found: int, markers: int, images: Sequence[Any] | None, image_token: str
) -> None:
    if found != markers:
        raise SampleError(
            sample_id,
            f"the rendered conversation holds {found} {image_token} token(s) but the turns have "
            f"{markers} marker(s); does the chat template or a default system prompt add {image_token}?",
        )
    if images is not None and len(images) != markers:
        raise SampleError(sample_id, f"has {markers} {image_token} marker(s) but {len(images)} image(s)")


def _check_num_image_tokens(num_image_tokens: int) -> None:
    if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")


def tokenize_conversation(
    sample: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: int,
    image_token: str = "<image>",
    max_length: int | None = None,
    truncation: Truncation = "drop",
) -> dict[str, list[int]] | None:
    """`{"input_ids", "labels"}` of a canonical sample (see `normalize_sample`).

    Over `max_length`, the tail is cut if everything cut lies after the last image. If the cut
    would reach into an image run, or would leave no supervised token, `truncation` decides:
    "drop" returns None, "raise" raises `TruncationError` (a `SampleError`)."""
    if truncation not in ("drop", "raise"):
        raise ValueError(f"truncation must be 'drop' or 'raise', got {truncation!r}")
    try:
        return _encode(sample, tokenizer, num_image_tokens, image_token, max_length)
    except TruncationError:
        if truncation == "drop":
            return None
        raise


def _encode(
    sample: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: int,
    image_token: str,
    max_length: int | None,
) -> dict[str, list[int]]:
    _check_num_image_tokens(num_image_tokens)
    image_id = check_tokenizer(tokenizer, image_token)
    sample_id = sample.get("id")
    conversations = sample["conversations"]
    rendered = render_conversation(conversations, tokenizer, sample_id)
    # The template already wrote BOS (or whatever the model expects) into the text.
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    mask = _supervised_mask(ids, encoding["offset_mapping"], rendered.assistant_spans, special_ids(tokenizer))
    labels = [token if keep and token != image_id else IGNORE_INDEX for token, keep in zip(ids, mask)]
    _check_image_count(sample_id, ids.count(image_id), _count_markers(conversations, image_token),
                       sample.get("images"), image_token)
    input_ids, labels, last_image_end = _expand_images(ids, labels, image_id, num_image_tokens,
                                                       boundary_ids(tokenizer))

    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(sample_id, "has no supervised token (are the assistant turns empty?)")
    if max_length is not None and len(input_ids) > max_length:
        if last_image_end > max_length:
            raise TruncationError(
                sample_id,
                f"is {len(input_ids)} tokens long, over max_length={max_length}, and its images end "
                f"at token {last_image_end}: truncating would cut through an image",
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise TruncationError(
                sample_id,
                f"is {len(input_ids)} tokens long, over max_length={max_length}; truncating leaves "
                "no supervised token",
            )
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(
    conversations: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: int,
    image_token: str = "<image>",
) -> list[int]:
    """Ids of a generation prompt: the turns up to and including the last human turn, then the
    template's generation prompt, with each `<image>` expanded to `num_image_tokens` ids."""
    _check_num_image_tokens(num_image_tokens)
    image_id = check_tokenizer(tokenizer, image_token)
    text = render_prompt(conversations, tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last_human = max(i for i, turn in enumerate(conversations) if turn["from"] == "human")
    _check_image_count(None, ids.count(image_id), _count_markers(conversations[: last_human + 1], image_token),
                       None, image_token)
    input_ids, _, _ = _expand_images(ids, [IGNORE_INDEX] * len(ids), image_id, num_image_tokens,
                                     boundary_ids(tokenizer))
    return input_ids
