"""open_clip vision towers (ViT-L-14 / openai, ViT-bigG-14 / laion2b_s39b_b160k, any open_clip
model name) as seechat encoders.

Only the `visual` tower is kept. Per-patch features come from `forward_intermediates`, which
stops after the block we read, so reading layer -2 skips the last block's compute.
`pretrained` is an open_clip tag or a checkpoint file; `None` builds a random-init tower, and
`config` overrides are deep-merged into the named model config (how tests make tiny towers).
"""
from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch

from seechat.models.encoders.base import VisionEncoder, clip_style_transform


class OpenCLIPVisionEncoder(VisionEncoder):
    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        feature_layer: int = -2,
        keep_cls: bool = False,
        dtype: str | None = None,
    ):
        super().__init__(feature_layer, keep_cls)
        self._args = {"backend": "open_clip", "name": name, "config": config or {},
                      "feature_layer": feature_layer, "keep_cls": keep_cls, "dtype": dtype}
        base = open_clip.get_model_config(name)
        if base is None:
            raise ValueError(
                f"unknown open_clip model {name!r}; see open_clip.list_models() for valid names"
            )
        kwargs = {}
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                kwargs[key] = _merge(base[key], value)
            else:
                kwargs[key] = value
        model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        visual = model.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(f"open_clip model {name!r} has no ViT tower; seechat needs a ViT")
        if dtype:
            visual = visual.to(getattr(torch, dtype))
        self.tower = visual
        size = visual.image_size
        grid_h, grid_w = visual.grid_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.hidden_size = visual.transformer.width
        self.grid = (grid_h, grid_w)
        self.num_patches = grid_h * grid_w + (1 if keep_cls else 0)
        self.layer_index = self._check_layer(len(visual.transformer.resblocks))
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
        self._transform = clip_style_transform(self.image_size, mean, std)

    @property
    def transform(self):
        return self._transform

    def offline_config(self) -> dict:
        """Builder kwargs that rebuild this architecture without any download."""
        return {**self._args, "pretrained": None}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        out = self.tower.forward_intermediates(
            pixel_values.to(dtype),
            indices=[self.layer_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.keep_cls,
        )
        features = out["image_intermediates"][0]
        if self.keep_cls:
            features = torch.cat([out["image_intermediates_prefix"][0], features], dim=1)
        return features


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
