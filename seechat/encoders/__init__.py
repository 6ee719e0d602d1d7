"""Vision encoders: one contract (`VisionEncoder`), two backends (open_clip, transformers)."""
from .base import VisionEncoder
from .hf import HFVisionEncoder
from .open_clip import OpenCLIPVisionEncoder

__all__ = ["VisionEncoder", "HFVisionEncoder", "OpenCLIPVisionEncoder"]
