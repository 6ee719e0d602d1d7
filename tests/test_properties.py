"""Property tests of tokenisation over random conversations (roles, turns, images, lengths,
non-ASCII text): labels fall only on assistant turns and decode to exactly their text plus the
end-of-turn token; every <image> becomes exactly `num_image_tokens` placeholders; truncation
keeps a prefix and never cuts through an image."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seechat.data import IGNORE_INDEX, normalize_sample, tokenize_conversation
from test_data import END, LEAD, make_tokenizer, supervised_runs

WORDS = ["red", "circle", "the", "big", "shape", "is", "on", "left", "What", "colour", "café", "naïve",
         "日本", "🙂", "x1", "42", "?", "!", "a-b", "don't"]
PROPERTIES = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["chatml", "llama2"])
def tok(request):
    return request.param, make_tokenizer(request.param)


text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


@st.composite
def conversations(draw) -> dict:
    """A sample: maybe a system turn, then 1-4 human/gpt exchanges; 0-2 images per human turn,
    their markers at random word positions."""
    turns = []
    if draw(st.booleans()):
        turns.append({"from": "system", "value": draw(text)})
    images = 0
    for _ in range(draw(st.integers(1, 4))):
        words = draw(text).split(" ")
        for _ in range(draw(st.integers(0, 2))):
            words.insert(draw(st.integers(0, len(words))), "<image>")
            images += 1
        turns.append({"from": "human", "value": " ".join(words)})
        turns.append({"from": "gpt", "value": draw(text)})
    return {"id": "p", "images": [f"{i}.png" for i in range(images)], "conversations": turns}


def image_runs(ids: list[int], image_id: int) -> list[int]:
    runs = "".join("i" if t == image_id else "." for t in ids).split(".")
    return [len(run) for run in runs if run]


@PROPERTIES
@given(raw=conversations(), num_image_tokens=st.sampled_from([1, 3, 8]))
def test_labels_are_exactly_the_assistant_turns(tok, raw, num_image_tokens):
    template, tokenizer = tok
    sample = normalize_sample(raw, 0)
    encoded = tokenize_conversation(sample, tokenizer, num_image_tokens)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    answers = [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"]
    # Decoded supervised text = each assistant turn's text + its end token, nothing else.
    assert supervised_runs(tokenizer, encoded) == [f"{LEAD[template]}{answer}{END[template]}" for answer in answers]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_runs(ids, image_id) == [num_image_tokens] * len(sample["images"])


@PROPERTIES
@given(raw=conversations(), num_image_tokens=st.sampled_from([1, 3, 8]), cut=st.integers(1, 200))
def test_truncation_keeps_a_prefix_and_whole_images(tok, raw, num_image_tokens, cut):
    _, tokenizer = tok
    sample = normalize_sample(raw, 0)
    full = tokenize_conversation(sample, tokenizer, num_image_tokens)
    max_length = min(cut, len(full["input_ids"]) + 5)
    short = tokenize_conversation(sample, tokenizer, num_image_tokens, max_length=max_length)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    images_end = max((i + 1 for i, t in enumerate(full["input_ids"]) if t == image_id), default=0)
    if max_length < images_end or all(label == IGNORE_INDEX for label in full["labels"][:max_length]):
        assert short is None  # dropped, never cut through an image or left with nothing to learn
    else:
        assert short == {"input_ids": full["input_ids"][:max_length], "labels": full["labels"][:max_length]}
        assert image_runs(short["input_ids"], image_id) == [num_image_tokens] * len(sample["images"])
