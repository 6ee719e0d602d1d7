"""What the native LM learns from and how it draws: the user-image supervision weight (0 is
exactly the loss without it), the weight of the drawings' image tokens, condition dropout,
classifier-free guidance (scale 1 is plain conditional sampling) and mixed-modal replies that
switch modes exactly at the boundary tokens."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seechat.data import SampleEncoder, VLMCollator
from seechat.data.tokenization import IGNORE_INDEX
from seechat.models.native.model import assemble_native
from seechat.models.native.sampling import decode_native, split_reply
from seechat.models.native.targets import drop_conditions
from seechat.models.native.vq import VQTokenizer

SIZE = 16
QWEN3 = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def model(experts, tmp_path_factory):
    """A random-init native model (16x16 images -> 4x4 codes of 125): the behaviour under test
    does not depend on training."""
    out = tmp_path_factory.mktemp("vq_guidance")
    torch.manual_seed(0)
    VQTokenizer(image_size=SIZE, channels=8, downsample=2, levels=(5, 5, 5)).save_pretrained(out)
    cfg = {"kind": "native", "native": {"vq": str(out), "qk_norm": True},
           "llm": {"tokenizer": experts["tokenizer"], "attn_implementation": "eager", "config": QWEN3}}
    torch.manual_seed(0)
    return assemble_native(cfg, VQTokenizer.from_pretrained(out)).eval()


@pytest.fixture(scope="module")
def batch(model, tmp_path_factory) -> dict:
    """A question about an image (user-turn image), a drawing (assistant-turn image), right-padded."""
    root = tmp_path_factory.mktemp("guidance_images")
    for i, color in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (SIZE, SIZE), color).save(root / f"{i}.png")
    samples = [{"id": "q", "image": "0.png", "conversations": [
                   {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "red"}]},
               {"id": "d", "image": "1.png", "conversations": [
                   {"from": "human", "value": "draw a blue shape"}, {"from": "gpt", "value": "<image>"}]}]
    encoder = SampleEncoder(model.tokenizer, model.image_transform, model.num_image_tokens, image_root=str(root))
    collated = VLMCollator(model.tokenizer.pad_token_id)([encoder(s, i) for i, s in enumerate(samples)])
    return {k: collated[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_images", "labels")}


def reference_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target cross-entropies from full logits: (reply targets, codes of the user image)."""
    ids = model.spliced_ids(batch["input_ids"], batch["pixel_values"], batch["num_images"])
    logits = model.llm(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    reply = model.image_labels(ids, batch["labels"])[:, 1:]
    user = torch.full_like(reply, IGNORE_INDEX)
    boi = int((ids[0] == model.boi_id).nonzero()[0])
    user[0, boi : boi + 16] = ids[0, boi + 1 : boi + 17]  # the question image's 16 codes (targets at t-1)
    return (F.cross_entropy(logits[reply != IGNORE_INDEX], reply[reply != IGNORE_INDEX], reduction="none"),
            F.cross_entropy(logits[user != IGNORE_INDEX], user[user != IGNORE_INDEX], reduction="none"))


@torch.no_grad()
def test_user_image_weight_is_honoured(model, batch):
    reply, user = reference_losses(model, batch)
    answer = len(model.tokenizer("red<|im_end|>")["input_ids"])
    assert len(user) == 16 and len(reply) == answer + 16 + 2 + 1  # the drawing: 16 codes, boundaries, end
    ids = model.spliced_ids(batch["input_ids"], batch["pixel_values"], batch["num_images"])
    before = model._lm_loss(model.image_labels(ids, batch["labels"]), 0.0, input_ids=ids,
                            attention_mask=batch["attention_mask"]).loss  # the loss without the option
    try:
        model.user_image_weight = 0.0
        assert torch.equal(model(**batch).loss, before)  # weight 0: exactly today's loss
        assert before.item() == pytest.approx(reply.mean().item(), rel=1e-5)
        counted = model.supervised_labels(batch["input_ids"], batch["labels"])
        assert int((counted[:, 1:] != IGNORE_INDEX).sum()) == len(reply)
        for weight in (0.5, 1.0, 3.0):
            model.user_image_weight = weight
            expected = (reply.sum() + weight * user.sum()) / (len(reply) + weight * len(user))
            assert model(**batch).loss.item() == pytest.approx(expected.item(), rel=1e-5), weight
        counted = model.supervised_labels(batch["input_ids"], batch["labels"])
        assert int((counted[:, 1:] != IGNORE_INDEX).sum()) == len(reply) + 16  # the loop weights batches by this count
    finally:
        model.user_image_weight = 0.0


@torch.no_grad()
def test_reply_image_weight_is_honoured(model, batch):
    reply, _ = reference_losses(model, batch)
    answer = len(model.tokenizer("red<|im_end|>")["input_ids"])
    image = torch.zeros(len(reply), dtype=torch.bool)
    image[answer : answer + 16 + 2] = True  # the drawing's <im_start>, 16 codes, <im_end>; its end-of-turn is text
    try:
        for weight in (0.0, 0.1, 3.0):
            model.reply_image_weight = weight
            expected = (reply[~image].sum() + weight * reply[image].sum()) / ((~image).sum() + weight * image.sum())
            assert model(**batch).loss.item() == pytest.approx(expected.item(), rel=1e-5), weight
        model.reply_image_weight = 1.0
        assert model(**batch).loss.item() == pytest.approx(reply.mean().item(), rel=1e-5)
        model.user_image_weight = 0.5  # both weights at once: each set at its own
        _, user = reference_losses(model, batch)
        model.reply_image_weight = 0.1
        expected = ((reply[~image].sum() + 0.1 * reply[image].sum() + 0.5 * user.sum()) /
                    ((~image).sum() + 0.1 * image.sum() + 0.5 * len(user)))
        assert model(**batch).loss.item() == pytest.approx(expected.item(), rel=1e-5)
    finally:
        model.reply_image_weight, model.user_image_weight = 1.0, 0.0


@torch.no_grad()
def test_condition_dropout_nulls_the_whole_prompt_of_drawings_only(model, batch):
    ids = model.spliced_ids(batch["input_ids"], batch["pixel_values"], batch["num_images"])
    targets = model.image_labels(ids, batch["labels"])
    mask = batch["attention_mask"]
    kept = drop_conditions(ids, batch["labels"], targets, model.boi_id, model.null_id, 0.0, mask)
    assert torch.equal(kept, ids)
    dropped = drop_conditions(ids, batch["labels"], targets, model.boi_id, model.null_id, 1.0, mask)
    assert torch.equal(dropped[0], ids[0])  # the question (its image is in the user turn) keeps its prompt
    boi = int((ids[1] == model.boi_id).nonzero()[0])
    assert (dropped[1, :boi] == model.null_id).all()  # the drawing's prompt: all of it, template included
    assert torch.equal(dropped[1, boi:], ids[1, boi:])  # its image and end stay
    # in training, at rate 1 the loss is the loss on the nulled prompt; in eval there is no dropout
    model.cfg_dropout = 1.0
    try:
        model.train()
        trained = model(**batch).loss
        model.eval()
        assert not torch.equal(model(**batch).loss, trained)
    finally:
        model.cfg_dropout = 0.0
        model.eval()
    expected = model._lm_loss(targets, 0.0, input_ids=dropped, attention_mask=mask).loss
    assert trained.item() == pytest.approx(expected.item(), rel=1e-6)


@torch.no_grad()
def test_cfg_at_scale_one_equals_plain_conditional_sampling(model):
    prompts = ["draw a red shape", "draw a big blue circle"]  # different lengths: left padding
    batch = model.draw_prompts(prompts)
    n = model.vq.num_codes
    plain = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=n, do_sample=True,
                           temperature=0.9, top_k=20, eos_token_id=-1, allowed_ids=model.code_ids,
                           generator=torch.Generator().manual_seed(3))
    guided = decode_native(model, batch["input_ids"], batch["attention_mask"], n + 1, draw_only=True, cfg_scale=1.0,
                           temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(guided[:, :n], plain)
    assert (guided[:, n] == model.eoi_id).all() and bool(model.code_ids[guided[:, :n]].all())
    # scale 3: the first code is the argmax of c + 2 (c - u), u from the prompt nulled (near-zero temperature)
    logits = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
    twins = batch["input_ids"].masked_fill(batch["attention_mask"].bool(), model.null_id)
    twins[:, -1] = model.boi_id
    uncond = model.llm(input_ids=twins, attention_mask=batch["attention_mask"]).logits[:, -1]
    combined = (logits + 2.0 * (logits - uncond)).masked_fill(~model.code_ids, float("-inf"))
    first = decode_native(model, batch["input_ids"], batch["attention_mask"], 1, draw_only=True, cfg_scale=3.0,
                          temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first[:, 0], combined.argmax(-1))
    images = model.generate_images(prompts, temperature=1.0, top_k=10, cfg_scale=3.0,
                                   generator=torch.Generator().manual_seed(0))
    assert [im.size for im in images] == [(SIZE, SIZE)] * 2
    with pytest.raises(ValueError, match="cfg_scale=0"):
        decode_native(model, batch["input_ids"], batch["attention_mask"], 1, draw_only=True, cfg_scale=0)


@contextlib.contextmanager
def steered(model, script: list):
    """A hook on the random LM's head: call i adds 1e4 to the logit of `script[i]` (None: no push)."""
    calls = []

    def steer(module, args, output):
        want = script[len(calls)] if len(calls) < len(script) else None
        calls.append(want)
        if want is None:
            return output
        output = output.clone()
        output[..., want] += 1e4
        return output

    handle = model.llm.get_output_embeddings().register_forward_hook(steer)
    try:
        yield calls
    finally:
        handle.remove()


def text_image_text(model) -> tuple[int, int, list]:
    """Steer to: a text token, <im_start>, (the image: only the decoder's rules act), a text token, the end."""
    word, other = (model.tokenizer(t)["input_ids"][0] for t in ("red", " circle"))
    return word, other, [word, model.boi_id] + [None] * (model.vq.num_codes + 1) + [other, model.tokenizer.eos_token_id]


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@torch.no_grad()
def test_mixed_reply_switches_modes_exactly_at_the_boundary_tokens(model, cfg_scale):
    word, other, script = text_image_text(model)
    with steered(model, script) as calls:
        batch = model.prepare(["draw a red circle, then say what you drew"])
        tokens = decode_native(model, batch["input_ids"], batch["attention_mask"], 40, cfg_scale=cfg_scale,
                               temperature=1.0, generator=torch.Generator().manual_seed(0))[0].tolist()
        calls.clear()
        parts = model.mixed_reply("draw a red circle, then say what you drew", cfg_scale=cfg_scale,
                                  generator=torch.Generator().manual_seed(0))
    n = model.vq.num_codes
    assert tokens[:2] == [word, model.boi_id]
    image = tokens[2 : 2 + n]
    assert len(image) == n and bool(model.code_ids[torch.tensor(image)].all())  # exactly the VQ's codes
    assert tokens[2 + n] == model.eoi_id  # forced after the n-th code
    assert tokens[3 + n :] == [other, model.tokenizer.eos_token_id]  # text again, then the end
    assert not model.code_ids[torch.tensor([word, other])].any()
    assert [type(p) for p in split_reply(model, tokens)] == [str, list, str]
    assert isinstance(parts[0], str) and isinstance(parts[2], str) and len(parts) == 3
    assert isinstance(parts[1], Image.Image) and parts[1].size == (SIZE, SIZE)


@torch.no_grad()
def test_chat_writes_the_reply_text_with_its_image_saved_beside_it(model, tmp_path):
    from seechat.inference.chat import one_shot

    word, other, script = text_image_text(model)
    printed = io.StringIO()
    with steered(model, script):
        answer = one_shot(model, "draw a red circle, then say what you drew", [], out=printed,
                          images_dir=str(tmp_path / "reply"))
    saved = tmp_path / "reply" / "reply-0.png"
    text = model.tokenizer.decode([word]).strip(), model.tokenizer.decode([other]).strip()
    assert answer == f"{text[0]} [image: {saved}] {text[1]}" and printed.getvalue() == answer + "\n"
    assert sorted((tmp_path / "reply").iterdir()) == [saved]
    with Image.open(saved) as image:
        assert image.size == (SIZE, SIZE)


def test_an_image_cut_by_the_token_limit_is_dropped(model):
    tokens = [model.boi_id] + [model.vocab.offset] * 5  # 5 of 16 codes
    assert split_reply(model, tokens) == []
