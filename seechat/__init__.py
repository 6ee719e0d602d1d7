"""seechat: stitched-expert vision-language models (vision encoder + adapter + causal LLM) and an
early-fusion baseline, trained with accelerate."""
from .build import build_model
from .model import SeeChatVLM
from .saving import load

__version__ = "0.1.0"
__all__ = ["SeeChatVLM", "build_model", "load", "__version__"]
