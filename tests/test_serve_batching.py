"""Batching across requests: the answers are those of unbatched generation, every client gets
its own, and concurrent requests really share decoding steps (a small, bounded load test)."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
import torch

import seechat
from seechat.models.decoding import BatchDecoder, Sampling, Sequence, image_features
from seechat.models.prompting import prompt_ids, reply
from seechat.inference.serve.settings import Limits
from serve_helpers import Gate, data_url, running, user
from vlm_helpers import saved_model, shape_image

PROMPTS = ["What color is the shape?", "Is there a blue triangle in the image? yes", "Describe the picture in detail.",
           "red", "Does the image contain a green rectangle?", "What shape is in the image? circle."]


@pytest.fixture(scope="module")
def model(experts, tmp_path_factory):
    return seechat.load(saved_model(experts, tmp_path_factory.mktemp("batching") / "model"))


def _conversation(i: int):
    images = [shape_image((40 * i % 255, 30, 200))] if i % 2 else []
    turns = [{"from": "human", "value": "<image>\n" * len(images) + PROMPTS[i % len(PROMPTS)]}]
    if i % 3 == 2:  # a multi-turn one
        turns = [{"from": "system", "value": "Answer briefly."}, *turns, {"from": "gpt", "value": "red."},
                 {"from": "human", "value": "And the shape?"}]
    return turns, images


@pytest.mark.parametrize("encoded", [False, True])
def test_batched_rows_joining_midway_answer_as_generate_alone(model, encoded):
    """Left padding, masks, positions and cache merging: each row's greedy tokens equal
    `generate` on that prompt alone, however rows join and leave. `encoded`: some rows come
    with their images' encoder outputs (as the server computes them), beside rows with pixels."""
    decoder = BatchDecoder(model, max_batch=4)
    seqs, expected = [], []
    for i in range(7):
        turns, images = _conversation(i)
        budget = 4 + 3 * i
        expected.append(reply(model, turns, images, budget))
        pixels = torch.stack([model.image_transform(im) for im in images]) if images else None
        seqs.append(Sequence(prompt_ids(model.tokenizer, turns, model.num_image_tokens), pixels, budget))
        if encoded and i % 4 == 1:
            seqs[-1].features, seqs[-1].pixels = image_features(model, pixels), None
            assert seqs[-1].features is not None and seqs[-1].num_images == 1
    pending, steps = list(seqs), 0
    while pending or decoder.rows:
        if pending and steps % 2 == 0 and decoder.free:  # joins at different steps, 1-2 at a time
            take = min(decoder.free, 1 + steps % 3 % 2, len(pending))
            decoder.add([pending.pop(0) for _ in range(take)])
        decoder.step()
        steps += 1
    for seq, want in zip(seqs, expected):
        assert model.decode(torch.tensor([seq.tokens]))[0] == want.text
        assert len(seq.tokens) == want.completion_tokens
        assert (seq.finish == "stop") == want.stopped
    assert 1 < max(len(s.ids) for s in seqs) and min(len(s.ids) for s in seqs) < max(len(s.ids) for s in seqs)


def test_a_sampled_row_draws_as_it_would_alone(model):
    turns, _ = _conversation(0)
    ids = prompt_ids(model.tokenizer, turns, model.num_image_tokens)
    alone = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.9,
                           generator=torch.Generator().manual_seed(7))[0].tolist()
    decoder = BatchDecoder(model, max_batch=3)
    greedy = Sequence(prompt_ids(model.tokenizer, _conversation(4)[0], model.num_image_tokens), None, 10)
    sampled = Sequence(ids, None, 10, Sampling(True, 1.3, 0, 0.9, torch.Generator().manual_seed(7)))
    decoder.add([greedy])
    decoder.step()
    decoder.add([sampled])
    while decoder.rows:
        decoder.step()
    pad = model.tokenizer.pad_token_id
    assert sampled.tokens == [t for t in alone if t != pad]


def test_concurrent_clients_share_steps_and_get_their_own_answers(model):
    """16 clients x 2 requests (half streamed), loopback, each answer checked; under a minute."""
    gate = Gate(model)
    jobs = [(i, 6 + i % 5) for i in range(32)]
    expected = {i: reply(model, *_conversation(i), n).text for i, n in jobs}
    try:
        with running(model, Limits(max_batch=8, max_queue=64)) as (base, app):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

            def ask(job):
                i, n = job
                turns, images = _conversation(i)
                roles = {"human": "user", "gpt": "assistant", "system": "system"}
                messages = [user(t["value"].replace("<image>\n", ""), data_url(images[0])) if "<image>" in t["value"]
                            else {"role": roles[t["from"]], "content": t["value"]} for t in turns]
                if i % 2:
                    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, stream=True)
                    return i, "".join(c.choices[0].delta.content or "" for c in chunks)
                return i, client.chat.completions.create(model="tiny", messages=messages, max_tokens=n).choices[0].message.content

            start = time.time()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                answers = dict(pool.map(ask, jobs, timeout=120))
            assert time.time() - start < 120
            assert httpx.get(f"{base}/health").status_code == 200
    finally:
        gate.remove()
    assert answers == expected
    assert gate.widest > 1  # requests shared decoding steps


def test_stop_strings_end_the_answer_streamed_or_not(model):
    full = model.chat("Describe the picture in detail.", max_new_tokens=16)
    assert len(full) > 6
    stop = full[3:5]
    want = full[: full.index(stop)]
    with running(model) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        messages = [user("Describe the picture in detail.")]
        plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stop=[stop, "zzz"])
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stop=stop,
                                                     stream=True, stream_options={"include_usage": True}))
    assert plain.choices[0].message.content == want and plain.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
