"""transformers vision towers (CLIPVisionModel, SiglipVisionModel) as seechat encoders.

`name` is a Hub id or a local directory, loaded with `from_pretrained`. With `pretrained: null`
a random-init tower is built from `config` overrides instead (tests, tiny demo experts).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from seechat.errors import UserError
from seechat.models.encoders.base import VisionEncoder
from seechat.models.encoders.transforms import ProcessorTransform, default_processor_config
from seechat.models.pretrained import from_pretrained

logger = logging.getLogger(__name__)

# model_type -> (config class for random init, model class). Composite configs ("clip",
# "siglip") are accepted because CLIPVisionModel.from_pretrained reads their vision part.
_TOWERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
}


class HFVisionEncoder(VisionEncoder):
    def __init__(
        self,
        name: str | None = None,
        pretrained: bool | None = True,
        config: dict[str, Any] | None = None,
        arch: str | None = "clip",
        feature_layer: int = -2,
        keep_cls: bool = False,
        dtype: str | None = None,
        trust_remote_code: bool | None = False,
        processor: dict[str, Any] | None = None,
    ):
        super().__init__(feature_layer, keep_cls)
        if pretrained:
            if not name:
                raise ValueError("encoder.name is required when encoder.pretrained is true")
            key, remote = "model.encoder.name", bool(trust_remote_code)
            model_type = from_pretrained(AutoConfig.from_pretrained, name, key, remote).model_type
            if model_type not in _TOWERS:
                raise ValueError(
                    f"encoder {name!r} has model_type {model_type!r}; the hf backend supports "
                    f"{sorted(_TOWERS)}"
                )
            model_cls = _TOWERS[model_type][1]
            self.tower = from_pretrained(model_cls.from_pretrained, name, key, remote, dtype=_dtype(dtype),
                                         **(config or {}))
        else:
            arch = arch or "clip"
            if arch not in ("clip", "siglip"):
                raise ValueError(f"encoder.arch={arch!r}; valid: 'clip', 'siglip'")
            config_cls, model_cls = _TOWERS[arch]
            self.tower = model_cls(config_cls(**(config or {})))
        cfg = self.tower.config
        self.has_cls = isinstance(self.tower, CLIPVisionModel)  # SigLIP has no CLS token
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        grid = cfg.image_size // cfg.patch_size
        self.grid = (grid, grid)
        self.num_patches = grid * grid + (1 if self.has_cls and keep_cls else 0)
        self.hidden_index = self._check_layer(cfg.num_hidden_layers)
        arch = "clip" if self.has_cls else "siglip"
        config = processor or _processor_config(name if pretrained else None, arch, self.image_size)
        self._transform = ProcessorTransform(config)
        if self._transform.output_size != (self.image_size, self.image_size):
            raise UserError(
                f"encoder {name or arch!r}: its image processor makes {self._transform.output_size} images, "
                f"the tower reads {self.image_size}x{self.image_size}; fix the processor's size/crop_size"
            )

    @property
    def transform(self):
        return self._transform

    def offline_config(self) -> dict:
        """Builder kwargs that rebuild this architecture without any download."""
        return {
            "backend": "hf",
            "pretrained": False,
            "arch": "clip" if self.has_cls else "siglip",
            "config": self.tower.config.to_dict(),
            "feature_layer": self.feature_layer,
            "keep_cls": self.keep_cls,
            "processor": self._transform.config,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        # hidden_states[0] is the embedding output, block i's output is hidden_states[i + 1].
        features = out.hidden_states[self.hidden_index]
        if self.has_cls and not self.keep_cls:
            features = features[:, 1:]
        return features


def _dtype(name: str | None):
    return getattr(torch, name) if name else None


def _processor_config(path: str | None, arch: str, image_size: int) -> dict[str, Any]:
    """The tower's own image-processor config (`preprocessor_config.json` beside the weights,
    read with transformers' PIL backend), else the architecture's processor defaults."""
    if path:
        try:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(path, backend="pil").to_dict()
        except (OSError, ValueError, KeyError):
            logger.info("encoder %s has no image processor config; using %s's defaults", path, arch)
    return default_processor_config(arch, image_size)
