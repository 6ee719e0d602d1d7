"""LM head + cross-entropy at supervised positions only, in chunks.

A VLM batch is mostly image placeholders and prompt tokens; only the answer tokens carry
labels. The usual `lm_head(hidden)` over every position builds a `[B, T, V]` logits tensor
(V = 152k for Qwen2.5: 2.5 GB in fp32 for 4 x 1024 tokens) and spends three vocabulary-sized
matmuls per position, most of them thrown away by `ignore_index`.

`chunked_head_loss` takes the hidden states of the supervised positions only and processes
them `chunk_size` rows at a time. Its autograd function computes the gradients of the chunk
in the forward pass (softmax minus one-hot is the logits' gradient of cross-entropy), so only
one chunk's logits ever exist, in forward and in backward, and no matmul is recomputed: the
cost is the same three matmuls per supervised row as the unchunked version.

`z_loss` (PaLM, Chameleon) adds `z_loss * mean(logsumexp(logits)^2)` over the same rows: it
keeps the softmax normaliser near 1 so that logits cannot drift, which Chameleon needed to
train stably on mixed image/text sequences. Its logits' gradient, `2 * z_loss * lse *
softmax`, is added to the cross-entropy's in the same pass.

The head must compute what the LM's own CausalLM forward computes, or the model trains on one
function and answers with another. Some families transform the head's output: Gemma 2/3
soft-cap it (`final_logit_softcapping`: `c * tanh(z / c)`), Cohere multiplies it by
`logit_scale`, Granite divides it by `logits_scaling`. `logit_transform(llm)` reads that from the
config and checks it on a probe (the LM's own logits of a few tokens against head + transform on
its decoder's output); an LM whose logits the head cannot reproduce gets `None`, and
`supervised_lm_loss` then runs the LM's own forward (full logits: correct, more memory) and says so.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seechat.data.tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024

_frozen_casts: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] | None = None  # see `reuse_frozen_head_casts`


@contextlib.contextmanager
def reuse_frozen_head_casts():
    """Within the block, a frozen head weight is cast to the compute dtype once, not once per
    step. (With a 151,936 x 256 fp32 head the cast alone took 52 ms of a 400 ms loss step.)
    Only weights that do not require grad are kept, and only for the block: the training loop
    wraps its steps in it, and nothing changes a frozen weight while it trains."""
    global _frozen_casts
    outer, _frozen_casts = _frozen_casts, {}
    try:
        yield
    finally:
        _frozen_casts = outer


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype or weight.requires_grad or _frozen_casts is None:
        return weight.to(dtype)
    # The copy is reused only while the weight is the same tensor with the same storage, device
    # and in-place version: anything that writes or moves it makes a new copy.
    state = (weight._version, weight.data_ptr(), weight.device, dtype)
    hit = _frozen_casts.get(id(weight))
    if hit is None or hit[0] is not weight or hit[1] != state:
        hit = _frozen_casts[id(weight)] = (weight, state, weight.to(dtype))
    return hit[2]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@dataclass(frozen=True)
class LogitTransform:
    """What a CausalLM does to its head's output: `logits * scale`, then, with `softcap`,
    `softcap * tanh(logits / softcap)`."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.softcap

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return logits
        logits = logits.float() * self.scale
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def forward_and_slope(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 transformed logits and d(transformed)/d(logits) (None: the constant `scale`)."""
        z = logits.float() * self.scale
        if not self.softcap:
            return z, None
        t = torch.tanh(z.div_(self.softcap))
        slope = (1.0 - t.square()).mul_(self.scale)
        return t.mul_(self.softcap), slope


def config_transform(config) -> LogitTransform:
    """The logit transform a CausalLM's config asks for (Gemma 2/3, Cohere, Granite)."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere, Cohere 2
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite, GraniteMoE
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2, Gemma 3
    return LogitTransform(scale, float(softcap) if softcap else None)


def _probe_matches(llm: nn.Module, transform: LogitTransform) -> bool:
    """Whether head + `transform` on the decoder's output gives the LM's own logits on a few
    tokens. No grad, and in the mode the LM is in: both passes draw the same dropout masks from
    one seed (the caller's RNG state is put back). Switching to eval would make bitsandbytes
    repack 4-bit weights for CPU inference, after which no gradient flows through them."""
    weight = llm.get_input_embeddings().weight
    ids = (torch.arange(8) * 7919 % weight.shape[0]).unsqueeze(0).to(weight.device)
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        ref = llm(input_ids=ids, use_cache=False).logits
        torch.manual_seed(0)
        hidden = llm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = transform(llm.get_output_embeddings()(hidden)).float()
    tol = 1e-4 if ref.dtype == torch.float32 else 3e-2
    ref = ref.float()
    return ours.shape == ref.shape and bool((ours - ref).abs().max() <= tol * (1.0 + ref.abs().max()))


def logit_transform(llm: nn.Module) -> LogitTransform | None:
    """The transform that makes the chunked head equal `llm`'s own logits, or None when the
    config's known transforms do not (an unknown family: train through the LM's forward).
    Probed once per LM."""
    cached = getattr(llm, "_seechat_logit_transform", False)
    if cached is not False:
        return cached
    transform = config_transform(llm.config)
    if not _probe_matches(llm, transform):
        logger.warning(
            "%s: the LM head with %s does not reproduce the LM's own logits (a logit transform seechat "
            "does not know); training runs the LM's own forward instead of the chunked head (more memory)",
            type(llm).__name__, transform,
        )
        transform = None
    llm._seechat_logit_transform = transform
    return transform


class _ChunkedLinearCE(torch.autograd.Function):
    """mean cross-entropy (+ z-loss) of `transform(hidden @ weight.T (+ bias))` against `targets`,
    chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, z_loss: float = 0.0,  # type: ignore[override]
                transform: LogitTransform = LogitTransform()):
        dtype = _compute_dtype(hidden)
        n = hidden.shape[0]
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = _cast(weight, dtype)
        b = None if bias is None else _cast(bias, dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                t = targets[start : start + chunk_size]
                rows = torch.arange(len(t), device=t.device)
                logits = F.linear(h, w, b)  # in the compute dtype, as the unchunked head's
                slope = None
                if not transform.identity:  # in fp32, with its derivative for the backward
                    logits, slope = transform.forward_and_slope(logits)
                if z_loss:
                    lse = logits.float().logsumexp(-1)
                    total += z_loss * lse.square().sum()
                # One fp32 pass over the [rows, V] logits: log-probabilities give the
                # cross-entropy, and exponentiated in place, the softmax its gradient needs.
                g = logits.log_softmax(-1, dtype=torch.float32)
                del logits
                total -= g[rows, t].sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(sum CE)/d logits = softmax - one_hot; the mean's 1/n is applied here.
                g.exp_()
                if z_loss:  # d(z * lse^2)/d logits = 2 z lse softmax
                    g *= 1.0 + 2.0 * z_loss * lse.unsqueeze(-1)
                g[rows, t] -= 1.0
                if slope is not None:  # the chain rule through the transform
                    g *= slope
                    del slope
                elif transform.scale != 1.0:
                    g *= transform.scale
                g = g.div_(n).to(dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return gh, gw, gb, None, None, None, None


def chunked_head_loss(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
    z_loss: float = 0.0, transform: LogitTransform = LogitTransform(),
) -> torch.Tensor:
    """Mean cross-entropy of `logits = transform(head(hidden))` against `targets`, plus `z_loss`
    times the mean squared log-partition `logsumexp(logits)^2` when `z_loss` > 0.

    `hidden` [n, D] holds the supervised positions only, `targets` [n] their next-token ids.
    A plain `nn.Linear` head goes through the chunked function above (the full [n, V] logits
    never exist); any other head (a LoRA-wrapped or quantised one) falls back to per-chunk
    activation checkpointing, which keeps one chunk's logits alive at a time at the cost of
    recomputing the head in backward."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if type(head) is nn.Linear:
        return _ChunkedLinearCE.apply(hidden, head.weight, head.bias, targets, chunk_size, float(z_loss), transform)
    from torch.utils.checkpoint import checkpoint

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = transform(head(h)).float()
        loss = F.cross_entropy(logits, t, reduction="sum")
        return loss + z_loss * logits.logsumexp(-1).square().sum() if z_loss else loss

    total = sum(
        checkpoint(part, hidden[s : s + chunk_size], targets[s : s + chunk_size], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_size)
    )
    return total / hidden.shape[0]


def supervised_lm_loss(llm: nn.Module, labels: torch.Tensor, z_loss: float = 0.0, **inputs) -> torch.Tensor:
    """Mean next-token cross-entropy of the causal LM `llm` (the transformers model under any
    peft wrapper) on `inputs` (inputs_embeds, attention_mask, ...) at the positions `labels`
    supervises: the decoder, then the chunked head + the family's logit transform at those
    positions only; or, for an LM whose logits the head cannot reproduce, the LM's own forward."""
    transform = logit_transform(llm)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if transform is None:
        logits = llm(**inputs, use_cache=False).logits[:, :-1][keep].float()
        if not keep.any():
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, targets[keep])
        return loss + z_loss * logits.logsumexp(-1).square().mean() if z_loss else loss
    hidden = llm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    if not keep.any():  # nothing supervised: a zero that still has a graph
        return hidden.sum() * 0.0
    # Chunked: the [n_supervised, V] logits never exist at once.
    return chunked_head_loss(hidden[:, :-1][keep], llm.get_output_embeddings(), targets[keep],
                             z_loss=z_loss, transform=transform)
