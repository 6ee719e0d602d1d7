"""transformers vision towers (CLIPVisionModel, SiglipVisionModel, Siglip2VisionModel) as seechat
encoders. SigLIP 2 at fixed resolution is model_type "siglip" (SiglipVisionModel); the NaFlex
Siglip2VisionModel is fed one fixed square grid (`_fixed_grid`: seechat's token count is known
before any forward, NaFlex's depends on each image's aspect ratio).

`name` is a Hub id or a local directory, loaded with `from_pretrained`. With `pretrained: null`
a random-init tower is built from `config` overrides instead (tests, tiny demo experts).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
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
    "siglip2": (Siglip2VisionConfig, Siglip2VisionModel),  # NaFlex; fixed-resolution SigLIP 2 is "siglip"
    "siglip2_vision_model": (Siglip2VisionConfig, Siglip2VisionModel),
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
        self.tower = _build_tower(name, pretrained, config, arch, dtype, trust_remote_code)
        cfg = self.tower.config
        self.has_cls = isinstance(self.tower, CLIPVisionModel)  # SigLIP has no CLS token
        self.naflex = isinstance(self.tower, Siglip2VisionModel)
        arch = "clip" if self.has_cls else "siglip2" if self.naflex else "siglip"
        self.hidden_size = cfg.hidden_size
        if self.naflex:  # patches + spatial shapes in; seechat feeds one fixed square grid
            config = processor or _processor_config(name if pretrained else None, arch, 0)
            config = _fixed_grid(config)
            self.image_size = config["size"]["height"]
        else:
            self.image_size = cfg.image_size
            config = processor or _processor_config(name if pretrained else None, arch, self.image_size)
        grid = self.image_size // cfg.patch_size
        self.grid = (grid, grid)
        self.num_patches = grid * grid + (1 if self.has_cls and keep_cls else 0)
        self.hidden_index = self._check_layer(cfg.num_hidden_layers)
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
            "arch": "clip" if self.has_cls else "siglip2" if self.naflex else "siglip",
            "config": self.tower.config.to_dict(),
            "feature_layer": self.feature_layer,
            "keep_cls": self.keep_cls,
            "processor": self._transform.config,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        if self.naflex:
            out = self.tower(**_patches(pixel_values.to(dtype), self.tower.config.patch_size), output_hidden_states=True)
        else:
            out = self.tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        # hidden_states[0] is the embedding output, block i's output is hidden_states[i + 1].
        features = out.hidden_states[self.hidden_index]
        if self.has_cls and not self.keep_cls:
            features = features[:, 1:]
        return features


def _build_tower(name, pretrained, config, arch, dtype, trust_remote_code):
    if pretrained:
        if not name:
            raise ValueError("encoder.name is required when encoder.pretrained is true")
        key, remote = "model.encoder.name", bool(trust_remote_code)
        model_type = from_pretrained(AutoConfig.from_pretrained, name, key, remote).model_type
        if model_type not in _TOWERS:
            raise ValueError(
                f"encoder {name!r} has model_type {model_type!r}; the hf backend supports {sorted(_TOWERS)}"
            )
        model_cls = _TOWERS[model_type][1]
        return from_pretrained(model_cls.from_pretrained, name, key, remote, dtype=_dtype(dtype), **(config or {}))
    arch = arch or "clip"
    if arch not in ("clip", "siglip", "siglip2"):
        raise ValueError(f"encoder.arch={arch!r}; valid: 'clip', 'siglip', 'siglip2'")
    config_cls, model_cls = _TOWERS[arch]
    return model_cls(config_cls(**(config or {})))


def _fixed_grid(config: dict[str, Any]) -> dict[str, Any]:
    """A Siglip2 (NaFlex) processor config as a fixed square input: NaFlex resizes each image,
    keeping its aspect, to at most `max_num_patches` patches, so the token count depends on the
    image; seechat's encoders state theirs before any forward, so images are squashed to the
    square grid of max_num_patches (what NaFlex itself gives a square image)."""
    if "size" in config and "max_num_patches" not in config:
        return config  # already fixed (a saved model's)
    patch, count = int(config.get("patch_size", 16)), int(config.get("max_num_patches", 256))
    side = math.isqrt(count)
    if side * side != count:
        raise UserError(f"Siglip2 processor max_num_patches={count} is not a square grid; seechat needs one "
                        "(set the processor's max_num_patches to n*n, e.g. 256)")
    fixed = {k: v for k, v in config.items() if k not in ("patch_size", "max_num_patches")}
    return {**fixed, "do_resize": True, "size": {"height": side * patch, "width": side * patch}, "do_center_crop": False}


def _patches(pixels: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """[B, 3, S, S] -> Siglip2's inputs: patches [B, N, p*p*3] in its processor's order (rows of
    patches; inside a patch, rows, columns, then channels), an all-ones mask, the grid shapes."""
    b, c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    x = pixels.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, -1)
    mask = torch.ones(b, rows * cols, dtype=torch.long, device=pixels.device)
    shapes = torch.tensor([[rows, cols]] * b, dtype=torch.long, device=pixels.device)
    return {"pixel_values": x, "pixel_attention_mask": mask, "spatial_shapes": shapes}


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
