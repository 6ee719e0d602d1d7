"""Step-wise batched decoding: sequences join a running batch between steps and leave it when
they finish (continuous batching at token granularity), each with its own sampling settings.

`SeeChatVLM.generate` decodes a fixed batch to the end. A server cannot wait for that: a request
that arrives while others are being answered would wait for the slowest of them. Here the batch
is state (`BatchDecoder`): `add` prefills newcomers as one left-padded batch and merges their KV
cache into the running one (both left-padded to a common length; padded positions are masked,
so a row attends to exactly what it would attend to alone), `step` decodes one token for every
row, and finished or cancelled rows leave before the next step. Each row's greedy answer is the
one `generate` gives for it alone, and a sampled row draws from its own generator exactly as a
single-row `generate` would, so batching changes no answer (tests/test_serve_batching.py). A row may come with its images'
encoder outputs (`features`, from `image_features`) instead of pixels: computed before it joins.

Merging needs plain `DynamicLayer` caches (what `generate` uses). If the LM's cache is anything
else, newcomers wait until the running batch is empty (`joinable` is False): dynamic batching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from seechat.data.tokenization import stop_token_ids
from seechat.models.base import _pick


@dataclass
class Sampling:
    """How one row picks its tokens: greedy unless `do_sample`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass(eq=False)
class Sequence:
    """One prompt being answered. `on_token(token)` sees every new token and returns True to end
    the answer there (a stop string matched). `finish` becomes "stop" (end token or stop),
    "length" (`max_new_tokens` reached) or "cancelled" (`cancelled` was set from outside)."""

    ids: list[int]
    pixels: torch.Tensor | None = None  # [n_images, C, H, W]
    max_new_tokens: int = 32
    sampling: Sampling = field(default_factory=Sampling)
    on_token: Callable[[int], bool] | None = None
    features: torch.Tensor | None = None  # the images' encoder outputs instead of pixels (`image_features`)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    cancelled: bool = False

    @property
    def num_images(self) -> int:
        images = self.features if self.features is not None else self.pixels
        return 0 if images is None else int(images.shape[0])


@torch.no_grad()
def image_features(model: Any, pixels: torch.Tensor | None) -> torch.Tensor | None:
    """The vision encoder's outputs for `pixels` when the model has an encoder whose outputs its
    `embed` takes (`image_features`), else None. A server computes them beside the decoding
    thread (each request's images alone, as `generate` on that request alone would), so the
    prefill of joining rows runs only the adapter and the LM."""
    encoder = getattr(model, "encoder", None)
    if pixels is None or encoder is None:
        return None
    return encoder(pixels.to(model.device))


class BatchDecoder:
    """The running batch of `model` (a `SeeChatVLM`): at most `max_batch` rows at once."""

    def __init__(self, model: Any, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, cache length]: 0 on left padding
        self.positions: torch.Tensor | None = None  # [B] position of the token fed next
        self.next_tokens: torch.Tensor | None = None  # [B] the token fed next
        self.joinable = True
        # eos and the template's end-of-turn token, as generate() stops at (Gemma's <end_of_turn>)
        self.eos = set(stop_token_ids(model.tokenizer))
        # The native kind answers in text ids only (NativeVLM.text_ids); other kinds have no such mask.
        self.allowed_ids = getattr(model, "text_ids", None)

    @property
    def free(self) -> int:
        """How many sequences `add` may take now."""
        if self.rows and not self.joinable:
            return 0
        return self.max_batch - len(self.rows)

    # ------------------------------------------------------------------ public steps
    @torch.no_grad()
    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill `seqs` together, choose their first tokens, merge them into the batch.
        Returns the sequences that finished (any row, cancelled ones included)."""
        if not seqs:
            return self._drop_finished()
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences do not fit: {self.free} free place(s)")
        logits, cache, mask, positions = self._prefill(seqs)
        tokens = self._pick(logits, seqs)
        joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        if self.cache is None:
            self.cache, self.mask, self.positions, self.next_tokens = cache, mask, positions, tokens
            self.joinable = joinable
        else:
            self._merge(cache, mask, positions, tokens)
        self.rows += seqs
        self._record(seqs, tokens)
        return self._drop_finished()

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One new token for every row; returns the sequences that finished."""
        if not self.rows:
            return []
        finished = self._drop_finished()  # rows cancelled since the last step take no more work
        if not self.rows:
            return finished
        embeds = self.model.llm.get_input_embeddings()(self.next_tokens).unsqueeze(1)
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=self.positions[:, None],
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.mask, self.positions = mask, self.positions + 1
        tokens = self._pick(out.logits[:, -1].float(), self.rows)
        self.next_tokens = tokens
        self._record(self.rows, tokens)
        return finished + self._drop_finished()

    def cancel_all(self) -> list[Sequence]:
        """Forget the whole batch (after a failed step); returns the rows that were in it."""
        rows, self.rows = self.rows, []
        self.cache = self.mask = self.positions = self.next_tokens = None
        return rows

    # ------------------------------------------------------------------ internals
    def _prefill(self, seqs: list[Sequence]):
        device = self.model.device
        width = max(len(s.ids) for s in seqs)
        pad = self.model.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s.ids)) + s.ids for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s.ids)) + [1] * len(s.ids) for s in seqs], device=device)
        counts = torch.tensor([s.num_images for s in seqs], device=device)
        if any(s.features is not None for s in seqs):  # encoder outputs given: the rest computed alike
            features = [s.features if s.features is not None else image_features(self.model, s.pixels)
                        for s in seqs if s.num_images]
            embeds = self.model.embed(ids, None, counts, image_features=torch.cat(features).to(device))
        else:
            pixels = [s.pixels for s in seqs if s.pixels is not None]
            embeds = self.model.embed(ids, torch.cat(pixels).to(device) if pixels else None, counts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), cache, mask, mask.sum(-1)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append the newcomers' rows, left-padding whichever side is shorter."""
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)])
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.next_tokens = torch.cat([self.next_tokens, tokens])

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        logits[:, self.model.image_token_id] = float("-inf")  # never emit a placeholder
        if self.allowed_ids is not None:
            logits = logits.masked_fill(~self.allowed_ids.to(logits.device), float("-inf"))
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            s = seq.sampling
            if s.do_sample:  # a row of its own: the same draws as generate() on this row alone
                tokens[i] = _pick(logits[i : i + 1], True, s.temperature, s.top_k, s.top_p, s.generator)[0]
        return tokens

    def _record(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        for seq, token in zip(seqs, tokens.tolist()):
            if seq.finish is not None:
                continue
            seq.tokens.append(token)
            hit_stop = seq.on_token(token) if seq.on_token is not None else False
            if token in self.eos or hit_stop:
                seq.finish = "stop"
            elif len(seq.tokens) >= seq.max_new_tokens:
                seq.finish = "length"

    def _drop_finished(self) -> list[Sequence]:
        for seq in self.rows:
            if seq.cancelled and seq.finish is None:
                seq.finish = "cancelled"
        done = [s for s in self.rows if s.finish is not None]
        if not done:
            return []
        keep = [i for i, s in enumerate(self.rows) if s.finish is None]
        if not keep:
            self.cancel_all()
            return done
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.next_tokens = self.mask[index], self.positions[index], self.next_tokens[index]
        if not self.joinable:  # a cache this module does not know: only its rows are selected
            self.cache.batch_select_indices(index)
            return done
        start = int(self.mask.any(0).nonzero()[0])  # columns that are padding in every row left go
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        return done
