"""Vision encoders: one contract (`VisionEncoder`), two backends (open_clip, transformers)."""
from seechat.models.encoders.base import VisionEncoder
from seechat.models.encoders.hf import HFVisionEncoder
from seechat.models.encoders.open_clip import OpenCLIPVisionEncoder

__all__ = ["VisionEncoder", "HFVisionEncoder", "OpenCLIPVisionEncoder"]
