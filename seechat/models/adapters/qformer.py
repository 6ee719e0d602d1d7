"""BLIP-2's Q-Former as an adapter, built on transformers' `Blip2QFormerModel`.

Learned query tokens attend to the (layer-normed) patch features through cross-attention every
`cross_attention_frequency` layers; a linear layer maps the query outputs to the LLM width.
The output length is the number of queries (32 in BLIP-2), whatever the patch count.

Its size follows the LM it feeds unless a recipe sets it (`derive`): width min(768, LM width),
64-wide heads, a 4x feed-forward, depth min(12, LM layers / 2). On BLIP-2's experts (OPT-2.7B:
2560 wide, 32 layers; FlanT5-XL: 2048, 24) that is BLIP-2's BERT-base Q-Former, 12 x 768 with 12
heads and 3072; before a small LM it shrinks with it instead of outweighing it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from seechat.models.adapters.base import Adapter, Experts, divisor_at_most, unset

# BERT-base, BLIP-2's Q-Former: the ceiling of the derived width and depth.
_BERT_BASE_WIDTH, _BERT_BASE_LAYERS, _HEAD_DIM = 768, 12, 64


class QFormerAdapter(Adapter):
    follows_experts = ("hidden_size", "num_layers", "num_heads", "intermediate_size")

    @classmethod
    def derive(cls, cfg: dict[str, Any], experts: Experts) -> dict[str, Any]:
        out = dict(cfg)
        if unset(out, "hidden_size"):
            out["hidden_size"] = min(_BERT_BASE_WIDTH, experts.llm_width)
        width = out["hidden_size"]
        if unset(out, "num_layers"):
            # at most half as deep as the LM: BLIP-2 puts 12 layers before 24- and 32-layer LMs
            out["num_layers"] = min(_BERT_BASE_LAYERS, max(1, experts.llm_layers // 2))
        if unset(out, "num_heads"):
            out["num_heads"] = divisor_at_most(width, width // _HEAD_DIM)
        if unset(out, "intermediate_size"):
            out["intermediate_size"] = 4 * width
        return out

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__(in_dim, out_dim)
        if num_queries < 1:
            raise ValueError(f"adapter.num_queries must be >= 1, got {num_queries}")
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=in_dim,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.vision_norm = nn.LayerNorm(in_dim)  # BLIP-2's ln_vision
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, hidden_size))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(hidden_size, out_dim)
        self.num_queries = num_queries

    def num_tokens(self, n_patches: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.vision_norm(features)
        queries = self.query_tokens.expand(features.shape[0], -1, -1).to(features.dtype)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features)
        return self.proj(out.last_hidden_state)
