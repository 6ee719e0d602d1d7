"""Adapters joining a vision encoder to an LLM: LLaVA MLP, BLIP-2 Q-Former, Qwen-VL resampler."""
from seechat.models.adapters.base import AUTO, Adapter, Experts
from seechat.models.adapters.mlp import MLPAdapter
from seechat.models.adapters.qformer import QFormerAdapter
from seechat.models.adapters.resampler import ResamplerAdapter, sincos_2d

__all__ = ["AUTO", "Adapter", "Experts", "MLPAdapter", "QFormerAdapter", "ResamplerAdapter", "sincos_2d"]
