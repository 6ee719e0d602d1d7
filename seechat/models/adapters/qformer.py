"""BLIP-2's Q-Former as an adapter, built on transformers' `Blip2QFormerModel`.

Learned query tokens attend to the (layer-normed) patch features through cross-attention every
`cross_attention_frequency` layers; a linear layer maps the query outputs to the LLM width.
The output length is the number of queries (32 in BLIP-2), whatever the patch count.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from seechat.models.adapters.base import Adapter


class QFormerAdapter(Adapter):
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
