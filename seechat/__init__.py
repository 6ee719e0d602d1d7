"""seechat: stitched-expert vision-language models (vision encoder + adapter + causal LLM) and an
early-fusion baseline, trained with accelerate.

`import seechat` is cheap (the command line starts fast); torch and transformers load on the
first call of `load` / `build_model`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["build_model", "load", "__version__"]

if TYPE_CHECKING:
    from seechat.models.base import SeeChatVLM


def load(directory: Any, **kwargs: Any) -> "SeeChatVLM":
    """A saved model (a run's `final/`), ready for `chat` / `generate`; see `seechat.models.kinds.load`."""
    from seechat.models.kinds import load as load_model

    return load_model(directory, **kwargs)


def build_model(model_cfg: dict, modes: dict[str, str]) -> "SeeChatVLM":
    """A ready-to-train model from a recipe's `model` section; see `seechat.models.kinds.build_model`."""
    from seechat.models.kinds import build_model as build

    return build(model_cfg, modes)
