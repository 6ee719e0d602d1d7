"""Adapters joining a vision encoder to an LLM: LLaVA MLP, BLIP-2 Q-Former, Qwen-VL resampler."""
from seechat.models.adapters.base import Adapter
from seechat.models.adapters.mlp import MLPAdapter
from seechat.models.adapters.qformer import QFormerAdapter
from seechat.models.adapters.resampler import ResamplerAdapter, sincos_2d

__all__ = ["Adapter", "MLPAdapter", "QFormerAdapter", "ResamplerAdapter", "sincos_2d"]
