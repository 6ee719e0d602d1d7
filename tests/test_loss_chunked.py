"""Loss only where labels are: the chunked head + cross-entropy equals the full-logits one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seechat.models.kinds import build_model
from seechat.models.loss import chunked_head_loss

from conftest import image_batch, model_config


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_grads_equal_full(chunk, bias):
    torch.manual_seed(0)
    head = nn.Linear(32, 5000, bias=bias)
    hidden = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(0, 5000, (50,))
    full = F.cross_entropy(head(hidden), targets)
    full_grads = torch.autograd.grad(full, [hidden, *head.parameters()])
    loss = chunked_head_loss(hidden, head, targets, chunk_size=chunk)
    grads = torch.autograd.grad(loss * 3.0, [hidden, *head.parameters()])  # scaled upstream grad
    assert abs(loss.item() - full.item()) <= 1e-5 * abs(full.item())
    for g, ref in zip(grads, full_grads):
        torch.testing.assert_close(g, 3.0 * ref, rtol=1e-5, atol=1e-7)


def test_frozen_head_gives_hidden_grad_only():
    torch.manual_seed(0)
    head = nn.Linear(16, 300).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 300, (9,))
    chunked_head_loss(hidden, head, targets, chunk_size=4).backward()
    ref = hidden.detach().clone().requires_grad_(True)
    F.cross_entropy(head(ref), targets).backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_non_linear_head_falls_back_to_checkpointed_chunks():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 400))
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 400, (11,))
    loss = chunked_head_loss(hidden, head, targets, chunk_size=3)
    full = F.cross_entropy(head(hidden), targets)
    assert abs(loss.item() - full.item()) <= 1e-5 * abs(full.item())


def test_bad_chunk_and_shape_are_named():
    head = nn.Linear(4, 10)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_head_loss(torch.randn(2, 4), head, torch.tensor([1, 2]), chunk_size=0)
    with pytest.raises(ValueError, match="3 hidden rows but 2 targets"):
        chunked_head_loss(torch.randn(3, 4), head, torch.tensor([1, 2]))


def test_vlm_loss_equals_full_logits_loss(experts):
    """The model's supervised-only loss equals CE over the LM's full [B, T, V] logits, and so do
    the gradients of every trained parameter."""
    torch.manual_seed(0)
    model = build_model(model_config(experts, llm="qwen2"), {"encoder": "frozen", "adapter": "full", "llm": "full"})
    batch = image_batch(model)
    loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"])
    logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(full, params)
    assert abs(loss.item() - full.item()) <= 1e-5 * abs(full.item())
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_frozen_head_is_cast_once_per_block_and_a_trained_one_every_time():
    from seechat.models.loss import reuse_frozen_head_casts

    frozen = nn.Linear(8, 50, bias=False).requires_grad_(False)
    trained = nn.Linear(8, 50, bias=False)
    h, t = torch.randn(6, 8, requires_grad=True), torch.randint(0, 50, (6,))

    def casts(head) -> int:
        with torch.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):
                chunked_head_loss(h, head, t).backward()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    plain, plain_trained = casts(frozen), casts(trained)
    with reuse_frozen_head_casts():
        assert casts(frozen) == plain - 2  # the weight: once instead of 3 times
        assert casts(trained) == plain_trained  # a weight that trains changes every step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached = chunked_head_loss(h, frozen, t)
        with torch.no_grad():
            frozen.weight.mul_(2.0)  # written in place inside the block: the copy is made again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            changed = chunked_head_loss(h, frozen, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(changed, chunked_head_loss(h, frozen, t))  # same numbers either way
        with torch.no_grad():
            frozen.weight.div_(2.0)
        assert torch.equal(cached, chunked_head_loss(h, frozen, t))
