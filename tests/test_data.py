"""Tests of the data path: schema, readers, chat-template labels, <image> expansion, truncation,
image loading errors, dataset skipping, collation and length-grouped sampling."""
from __future__ import annotations

import json
import logging
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from seechat.data import (
    IGNORE_INDEX,
    IterableVLMDataset,
    LengthGroupedSampler,
    SampleError,
    TemplateError,
    TruncationError,
    VLMCollator,
    VLMDataset,
    check_tokenizer,
    encode_prompt,
    load_hf_dataset,
    load_image,
    normalize_sample,
    read_llava_json,
    read_llava_records,
    tokenize_conversation,
)
from seechat.experiments.tiny import train_tokenizer

SENTENCES = [
    f"{adjective} {colour} {shape} {place}"
    for adjective, colour, shape, place in zip(
        ["a small", "the big", "one tiny", "a large", "this odd", "that round"] * 6,
        ["red", "green", "blue", "yellow", "black", "white"] * 6,
        ["circle", "square", "triangle", "star", "shape", "image"] * 6,
        ["on the left", "in the middle", "at the top", "near the edge", "is shown", "what is it?"] * 6,
    )
] + ["What shape is in the image?", "What colour is the shape?", "Describe the picture briefly."]

END = {"chatml": "<|im_end|>", "llama2": " </s>"}
# The Llama-2 template writes " " after "[/INST]", outside the generation prompt: the model has to
# produce it, so it is supervised with the answer (as part of " red", or as its own token). It ends
# the answer with " </s>": the space and the end token are both supervised.
LEAD = {"chatml": "", "llama2": " "}


def make_tokenizer(template: str):
    tokenizer = train_tokenizer(SENTENCES, vocab_size=400, template=template)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module", params=["chatml", "llama2"])
def tok(request):
    return request.param, make_tokenizer(request.param)


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer("chatml")


def conversation(answers=("red", "a small circle"), images=2):
    """A system prompt, then one human/gpt exchange per answer; images go in the first turns."""
    markers = [1 if i < images else 0 for i in range(len(answers))]
    markers[0] += max(0, images - len(answers))
    turns = [{"from": "system", "value": "Answer briefly."}]
    for answer, count in zip(answers, markers):
        turns += [{"from": "human", "value": "<image>\n" * count + "What is in the image?"},
                  {"from": "gpt", "value": answer}]
    return {"id": "s1", "images": [f"img{i}.png" for i in range(images)], "conversations": turns}


def supervised_runs(tokenizer, encoded):
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def write_png(path, colour):
    Image.new("RGB", (12, 10), colour).save(path)
    return str(path)


# --- schema ---------------------------------------------------------------------------------


def test_normalize_llava_single_image_without_marker():
    raw = {"image": "coco/1.jpg", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A cat."}]}
    sample = normalize_sample(raw, 7)
    assert sample == {
        "id": "7",
        "images": ["coco/1.jpg"],
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
    }
    assert raw["conversations"][0]["value"] == "What?"  # the input is not mutated


def test_normalize_text_only_and_role_aliases():
    sample = normalize_sample({"id": 3, "conversations": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]}, 0)
    assert sample == {"id": "3", "images": [],
                      "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}


@pytest.mark.parametrize(
    "raw, problem",
    [
        ({"id": "x", "conversations": []}, "non-empty list"),
        ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, "no 'gpt' turn"),
        ({"id": "x", "conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "a"}]}, "role 'bot'"),
        ({"id": "x", "images": ["a.png"], "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]}, "2 <image> marker(s)"),
        ({"id": "x", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
         "0 image(s)"),
    ],
)
def test_normalize_rejects(raw, problem):
    with pytest.raises(SampleError) as info:
        normalize_sample(raw, 0)
    assert "sample 'x'" in str(info.value) and problem in str(info.value)


def test_sample_error_pickles_with_its_message():
    err = SampleError("abc", "broken", file="d.jsonl:3")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "sample 'abc' in d.jsonl:3: broken" and again.file == "d.jsonl:3"


# --- labels and <image> expansion -----------------------------------------------------------


def test_golden_label_mask(tok):
    template, tokenizer = tok
    sample = normalize_sample(conversation(answers=("red", "a small circle", "assistant")), 0)
    encoded = tokenize_conversation(sample, tokenizer, num_image_tokens=4)
    assert supervised_runs(tokenizer, encoded) == [
        f"{LEAD[template]}{answer}{END[template]}" for answer in ("red", "a small circle", "assistant")
    ]
    # Nothing else is supervised: everything outside those runs, images included, is -100.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert all(label == IGNORE_INDEX for token, label in zip(encoded["input_ids"], encoded["labels"])
               if token == image_id)
    rendered = tokenizer.apply_chat_template(
        [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
         for t in sample["conversations"]], tokenize=False)
    plain = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(encoded["input_ids"]) == len(plain) + 2 * (4 - 1)


def test_chatml_newline_after_end_token_is_not_supervised(chatml):
    encoded = tokenize_conversation(normalize_sample(conversation(answers=("red",), images=1), 0), chatml, 2)
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert encoded["input_ids"][-2:] == [im_end, chatml.convert_tokens_to_ids("Ċ")]
    assert encoded["labels"][-2:] == [im_end, IGNORE_INDEX]


@pytest.mark.parametrize("num_image_tokens", [16, 32, 256])
@pytest.mark.parametrize("num_images", [1, 3])
def test_image_expansion_count(tok, num_image_tokens, num_images):
    _, tokenizer = tok
    sample = normalize_sample(conversation(answers=("red", "blue", "green"), images=num_images), 0)
    ids = tokenize_conversation(sample, tokenizer, num_image_tokens)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == num_images * num_image_tokens
    runs = "".join("i" if t == image_id else "." for t in ids).split(".")
    assert sorted(len(run) for run in runs if run) == [num_image_tokens] * num_images


def test_encode_prompt_is_the_prefix_before_the_last_answer(tok):
    _, tokenizer = tok
    sample = normalize_sample(conversation(answers=("red", "blue"), images=2), 0)
    full = tokenize_conversation(sample, tokenizer, 5)
    prompt = encode_prompt(sample["conversations"][:-1], tokenizer, 5)
    last_answer_start = max(i for i, label in enumerate(full["labels"])
                            if label != IGNORE_INDEX and full["labels"][i - 1] == IGNORE_INDEX)
    assert prompt == full["input_ids"][:last_answer_start]
    # A trailing gpt turn is not part of a prompt.
    assert encode_prompt(sample["conversations"], tokenizer, 5) == prompt


def test_tokenizer_without_image_token_is_refused():
    tokenizer = train_tokenizer(SENTENCES, vocab_size=400, template="chatml")
    with pytest.raises(ValueError, match="add_tokens"):
        check_tokenizer(tokenizer)


def test_template_that_is_not_prefix_stable_is_refused():
    tokenizer = make_tokenizer("chatml")
    # Writes the number of messages first, so every prefix renders differently.
    tokenizer.chat_template = "{{ messages|length }}" + tokenizer.chat_template
    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize_conversation(normalize_sample(conversation(images=0), 0), tokenizer, 4)


def test_conversation_the_template_refuses_is_a_sample_error():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                               "{% endif %}" + tokenizer.chat_template)
    with pytest.raises(SampleError, match="sample 's1': the chat template rejected .*no system role"):
        tokenize_conversation(normalize_sample(conversation(images=0), 0), tokenizer, 4)


# --- truncation -----------------------------------------------------------------------------


def long_answer_sample():
    return normalize_sample(conversation(answers=("the big red circle on the left " * 4,), images=2), 0)


def test_truncation_cuts_text_after_the_last_image(chatml):
    sample = long_answer_sample()
    full = tokenize_conversation(sample, chatml, 8)
    image_id = chatml.convert_tokens_to_ids("<image>")
    last_image_end = max(i for i, t in enumerate(full["input_ids"]) if t == image_id) + 1
    max_length = len(full["input_ids"]) - 10
    cut = tokenize_conversation(sample, chatml, 8, max_length=max_length)
    assert cut == {"input_ids": full["input_ids"][:max_length], "labels": full["labels"][:max_length]}
    # Cutting through the second image: dropped, or an error naming sample, length and limit.
    assert tokenize_conversation(sample, chatml, 8, max_length=last_image_end - 1) is None
    with pytest.raises(TruncationError) as info:
        tokenize_conversation(sample, chatml, 8, max_length=last_image_end - 1, truncation="raise")
    message = str(info.value)
    assert "sample 's1'" in message and str(len(full["input_ids"])) in message and f"max_length={last_image_end - 1}" in message
    # Right after the images: no answer token left, so nothing to train on.
    assert tokenize_conversation(sample, chatml, 8, max_length=last_image_end + 1) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_length=st.integers(min_value=1, max_value=120), num_image_tokens=st.sampled_from([1, 3, 16]))
def test_truncation_never_splits_an_image(chatml, max_length, num_image_tokens):
    sample = long_answer_sample()
    full = tokenize_conversation(sample, chatml, num_image_tokens)
    cut = tokenize_conversation(sample, chatml, num_image_tokens, max_length=max_length)
    image_id = chatml.convert_tokens_to_ids("<image>")
    last_image_end = max(i for i, t in enumerate(full["input_ids"]) if t == image_id) + 1
    keeps_answer = any(label != IGNORE_INDEX for label in full["labels"][:max_length])
    if max_length < last_image_end or not keeps_answer:
        assert cut is None
    else:
        assert cut["input_ids"] == full["input_ids"][:max_length]
        assert cut["input_ids"].count(image_id) == 2 * num_image_tokens


# --- images ---------------------------------------------------------------------------------


def test_load_image_resolves_root_and_converts_to_rgb(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "grey.png")
    image = load_image("grey.png", image_root=tmp_path)
    assert image.mode == "RGB" and image.size == (5, 4)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_load_image_errors_name_the_file(tmp_path, damage):
    path = tmp_path / "bad.png"
    if damage == "garbage":
        path.write_bytes(b"\x00not an image at all" * 10)
    elif damage == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(SampleError) as info:
        load_image(str(path), sample_id="s9")
    assert str(path) in str(info.value) and "sample 's9'" in str(info.value)


# --- readers --------------------------------------------------------------------------------


def test_malformed_jsonl_line_raises_or_is_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}
    path.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps({**good, "id": "b"}) + "\n[1, 2]\n")
    with pytest.raises(SampleError) as info:
        read_llava_json(path)
    assert f"{path}:2" in str(info.value) and "line 2" in str(info.value)
    result = read_llava_records(path, on_error="skip")
    assert [r["id"] for r in result.records] == ["a", "b"]
    assert result.sources == [f"{path}:1", f"{path}:4"]
    assert result.skipped_ids == [f"{path}:2", f"{path}:5"]


def test_json_list_file(tmp_path):
    path = tmp_path / "data.json"
    records = [{"id": "a", "image": "x.png", "conversations": []}]
    path.write_text(json.dumps(records, indent=1))
    assert read_llava_json(path) == records


# --- dataset and collation ------------------------------------------------------------------


def test_text_only_sample_batches_with_image_samples(tmp_path, chatml):
    red, green, blue = (write_png(tmp_path / f"{c}.png", c) for c in ("red", "green", "blue"))
    samples = [
        {"id": "one", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "two", "images": [green, blue], "conversations": [
            {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "green blue"}]},
    ]
    dataset = VLMDataset(samples, chatml, to_tensor, num_image_tokens=4, image_root=tmp_path)
    items = [dataset[i] for i in range(3)]
    assert items[1]["pixel_values"] is None and items[1]["num_images"] == 0
    batch = VLMCollator(chatml.pad_token_id)(items)
    assert batch["ids"] == ["one", "text", "two"] and batch["skipped"] == []
    assert batch["num_images"].tolist() == [1, 0, 2]
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    # Images are concatenated in sample order: red, then green, then blue.
    assert batch["pixel_values"][:, :, 0, 0].argmax(dim=1).tolist() == [0, 1, 2]
    image_id = chatml.convert_tokens_to_ids("<image>")
    assert ((batch["input_ids"] == image_id).sum(dim=1)).tolist() == [4, 0, 8]
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(item["input_ids"]) for item in items]
    lengths = dataset.lengths()
    assert len(lengths) == 3 and lengths[2] > lengths[0] > lengths[1]


def test_dataloader_with_sampler_and_streaming_dataset(chatml):
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "Shape? " * i},
                                              {"from": "gpt", "value": "star"}]} for i in range(7)]
    rows[4] = {"id": "r4", "conversations": [{"from": "human", "value": "no answer"}]}
    dataset = VLMDataset(rows, chatml, to_tensor, num_image_tokens=4, on_error="skip")
    loader = DataLoader(dataset, batch_size=3, sampler=LengthGroupedSampler(dataset.lengths(), 3, seed=1),
                        collate_fn=VLMCollator(chatml.pad_token_id))
    batches = list(loader)
    assert sorted(i for b in batches for i in b["ids"]) == ["r0", "r1", "r2", "r3", "r5", "r6"]
    assert [s[0] for b in batches for s in b["skipped"]] == ["r4"]
    streamed = list(IterableVLMDataset(iter(rows), tokenizer=chatml, image_transform=to_tensor,
                                       num_image_tokens=4, on_error="skip"))
    assert [item["id"] for item in streamed] == [row["id"] for row in rows]
    assert "no 'gpt' turn" in streamed[4]["skipped"]
    assert torch.equal(streamed[6]["input_ids"], dataset[6]["input_ids"])


def test_skip_and_raise_on_bad_samples(tmp_path, chatml, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    write_png(tmp_path / "ok.png", "red")
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    lines = [
        json.dumps({"id": "good", "image": "ok.png", "conversations": turns}),
        json.dumps({"id": "corrupt", "image": "corrupt.png", "conversations": turns}),
        "{oops",
        json.dumps({"id": "mismatch", "images": [], "conversations": turns}),
        json.dumps({"id": "long", "image": "ok.png", "conversations": turns}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    read = read_llava_records(path, on_error="skip")
    assert read.skipped_ids == [f"{path}:3"]

    read.records[3]["conversations"] = turns + [{"from": "human", "value": "more " * 200},
                                                {"from": "gpt", "value": "x"}]
    # max_length leaves room for the image but not the long tail: cut, so kept. "mismatch" has
    # a marker and no image.
    dataset = VLMDataset(read, chatml, to_tensor, num_image_tokens=4, max_length=40,
                         on_error="skip", image_root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="seechat.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert [item.get("skipped") is not None for item in items] == [False, True, True, False]
    assert str(tmp_path / "corrupt.png") in items[1]["skipped"]
    assert f"{path}:4" in items[2]["skipped"]
    assert "'corrupt'" in caplog.text and "'mismatch'" in caplog.text
    assert len(items[3]["input_ids"]) == 40

    batch = VLMCollator(chatml.pad_token_id)(items)
    assert batch["ids"] == ["good", "long"] and [sid for sid, _ in batch["skipped"]] == ["corrupt", "mismatch"]
    assert batch["pixel_values"].shape[0] == 2

    strict = VLMDataset(read, chatml, to_tensor, num_image_tokens=4, on_error="raise", image_root=tmp_path)
    with pytest.raises(SampleError) as info:
        strict[1]
    assert "sample 'corrupt'" in str(info.value) and "corrupt.png" in str(info.value)
    with pytest.raises(SampleError, match=re.escape(f"sample 'mismatch' in {path}:4")):
        strict[2]


def test_too_long_sample_is_dropped_or_raises(tmp_path, chatml):
    write_png(tmp_path / "ok.png", "red")
    samples = [{"id": "big", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}]
    kwargs = dict(num_image_tokens=64, max_length=32, image_root=tmp_path)
    assert "max_length=32" in VLMDataset(samples, chatml, to_tensor, **kwargs)[0]["skipped"]
    with pytest.raises(TruncationError, match="sample 'big'"):
        VLMDataset(samples, chatml, to_tensor, truncation="raise", **kwargs)[0]
    assert "skipped" in VLMDataset(samples, chatml, to_tensor, truncation="raise", on_error="skip", **kwargs)[0]


def test_hf_dataset_input(tmp_path, chatml):
    path = tmp_path / "data.jsonl"
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "star" * (i + 1)}]}
            for i in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    hf = load_hf_dataset(path, cache_dir=str(tmp_path / "cache"))
    dataset = VLMDataset(hf, chatml, to_tensor, num_image_tokens=4)
    assert len(dataset) == 3 and dataset[2]["id"] == "2" and dataset[2]["pixel_values"] is None
    assert dataset.lengths() == VLMDataset(rows, chatml, to_tensor, num_image_tokens=4).lengths()


def test_collator_padding_exact_values():
    items = [
        {"id": "a", "input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": None, "num_images": 0},
        {"id": "b", "input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None, "num_images": 0},
        {"id": "c", "skipped": "corrupt image"},
    ]
    right = VLMCollator(pad_token_id=0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["pixel_values"] is None and right["num_images"].tolist() == [0, 0]
    assert right["skipped"] == [("c", "corrupt image")]
    left = VLMCollator(pad_token_id=1, padding_side="left", pad_to_multiple_of=4)(items)
    assert left["input_ids"].tolist() == [[1, 5, 6, 7], [1, 1, 1, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    empty = VLMCollator(pad_token_id=0)([items[2]])
    assert empty["input_ids"] is None and empty["skipped"] == [("c", "corrupt image")]
    with pytest.raises(ValueError, match="pad token"):
        VLMCollator(pad_token_id=None)


# --- sampler --------------------------------------------------------------------------------


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 for i in range(103)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batch_mult=5)
    first = list(sampler)
    assert sorted(first) == list(range(103))
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batch_mult=5)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(103))
    assert lengths[first[0]] == max(lengths)
    # Each mega-batch of 20 is sorted longest first, apart from its head: the longest sample of
    # the epoch is swapped to the very front.
    for start in range(0, 103, 20):
        chunk = [lengths[i] for i in first[start + 1:start + 20]]
        assert chunk == sorted(chunk, reverse=True)
    # Grouped batches need less padding than the shuffled order they came from.
    shuffled = torch.randperm(103, generator=torch.Generator().manual_seed(3)).tolist()

    def padding(order):
        return sum(max(lengths[i] for i in order[s:s + 4]) * len(order[s:s + 4]) - sum(lengths[i] for i in order[s:s + 4])
                   for s in range(0, 103, 4))

    assert padding(first) < padding(shuffled) / 3
