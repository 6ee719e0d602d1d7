"""Adapters joining a vision encoder to an LLM: LLaVA MLP, BLIP-2 Q-Former, Qwen-VL resampler."""
from .base import Adapter
from .mlp import MLPAdapter
from .qformer import QFormerAdapter
from .resampler import ResamplerAdapter, sincos_2d

__all__ = ["Adapter", "MLPAdapter", "QFormerAdapter", "ResamplerAdapter", "sincos_2d"]
