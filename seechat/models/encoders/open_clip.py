"""open_clip vision towers (ViT-L-14 / openai, ViT-bigG-14 / laion2b_s39b_b160k, any open_clip
model name) as seechat encoders.

Only the vision tower is built: the model config's `vision_cfg` goes to open_clip's own vision
builder, and the text tower is never constructed (ViT-bigG-14's whole CLIP is 2.5 B parameters,
its vision tower 1.8 B). Pretrained weights are read for the `visual.*` keys only (lazily from
safetensors, memory-mapped from torch files); a checkpoint that needs open_clip's conversions
(big_vision .npz, TorchScript, another grid) falls back to building the whole model once.
Per-patch features come from `forward_intermediates`, which stops after the block we read.
`pretrained` is an open_clip tag or a checkpoint file; `None` builds a random-init tower, and
`config` overrides are deep-merged into the named model config (how tests make tiny towers).
The image transform is open_clip's own for the model's `preprocess_cfg` (the pretrained tag's:
resize_mode, interpolation, mean/std; `preprocess` overrides it, and saved models store it).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

import open_clip
import torch
from open_clip.model import _build_vision_tower

from seechat.errors import UserError
from seechat.models.encoders.base import VisionEncoder
from seechat.models.encoders.transforms import OpenCLIPTransform

logger = logging.getLogger(__name__)


class OpenCLIPVisionEncoder(VisionEncoder):
    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        feature_layer: int = -2,
        keep_cls: bool = False,
        dtype: str | None = None,
        preprocess: dict[str, Any] | None = None,
    ):
        super().__init__(feature_layer, keep_cls)
        self._args = {"backend": "open_clip", "name": name, "config": config or {},
                      "feature_layer": feature_layer, "keep_cls": keep_cls, "dtype": dtype}
        model_cfg = model_config(name, config)
        tag_cfg = _tag_config(name, pretrained)
        visual = build_visual(model_cfg)
        if pretrained:
            visual = _load_weights(visual, name, pretrained, tag_cfg, config)
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(f"open_clip model {name!r} has no ViT tower; seechat needs a ViT")
        if dtype:
            visual = visual.to(getattr(torch, dtype))
        self.tower = visual
        grid_h, grid_w = visual.grid_size
        self.image_size = visual.image_size[0]
        self.hidden_size = visual.transformer.width
        self.grid = (grid_h, grid_w)
        self.num_patches = grid_h * grid_w + (1 if keep_cls else 0)
        self.hidden_index = self._check_layer(len(visual.transformer.resblocks))
        self._transform = OpenCLIPTransform(preprocess or _preprocess_config(visual, tag_cfg))
        self._args["preprocess"] = self._transform.preprocess_cfg

    @property
    def transform(self):
        return self._transform

    def offline_config(self) -> dict:
        """Builder kwargs that rebuild this architecture without any download."""
        return {**self._args, "pretrained": None}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        if self.hidden_index == 0:  # the embeddings: what the first block reads (after ln_pre)
            tokens = self.tower._embeds(pixel_values)
            return tokens if self.keep_cls else tokens[:, 1:]
        out = self.tower.forward_intermediates(
            pixel_values,
            indices=[self.hidden_index - 1],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.keep_cls,
        )
        features = out["image_intermediates"][0]
        if self.keep_cls:
            features = torch.cat([out["image_intermediates_prefix"][0], features], dim=1)
        return features


def model_config(name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The named open_clip model config with `overrides` deep-merged in."""
    base = open_clip.get_model_config(name)
    if base is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() for valid names")
    return _merge(base, overrides or {})


def build_visual(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The vision tower alone, as open_clip's CLIP builds it (fp32), without the text tower."""
    return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                               quick_gelu=model_cfg.get("quick_gelu", False), cast_dtype=None)


def _tag_config(name: str, pretrained: str | None) -> dict[str, Any]:
    if not pretrained or os.path.isfile(pretrained):
        return {}
    cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(f"encoder.pretrained={pretrained!r} is neither a file nor an open_clip tag of {name!r} "
                        f"(its tags: {', '.join(tags) or 'none'})")
    return cfg


def _preprocess_config(visual: torch.nn.Module, tag_cfg: dict[str, Any]) -> dict[str, Any]:
    """What open_clip's create_model sets as `preprocess_cfg`: defaults, the tag's, the tower's size."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), tag_cfg)
    cfg["size"] = visual.image_size
    return cfg


def _load_weights(visual, name, pretrained, tag_cfg, config) -> torch.nn.Module:
    path = pretrained if os.path.isfile(pretrained) else open_clip.pretrained.download_pretrained(tag_cfg)
    try:
        state = _visual_state(path)
        visual.load_state_dict(state, strict=True)
        return visual
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        # Checkpoints that need open_clip's conversions: build the whole model once (more memory).
        logger.info("open_clip %s: %s needs open_clip's full loader (%s)", name, path, err)
        base = open_clip.get_model_config(name)
        kwargs = {k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                  for k, v in (config or {}).items()}
        return open_clip.create_model(name, pretrained=pretrained, **kwargs).visual


def _visual_state(path: str) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of an open_clip checkpoint, prefix removed, reading nothing else."""
    if str(path).endswith((".npz", ".npy")):
        raise ValueError("big_vision numpy weights")
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if _is_visual(k)}
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
        state = {k: v for k, v in state.items() if _is_visual(k)}
    state = {k.removeprefix("module.").removeprefix("visual."): v for k, v in state.items()}
    if not state:
        raise KeyError("no visual.* weights")
    return state


def _is_visual(key: str) -> bool:
    return key.removeprefix("module.").startswith("visual.")


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
