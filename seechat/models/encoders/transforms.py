"""A vision tower's image transform, taken from the tower's own preprocessing configuration.

* transformers towers: `ProcessorTransform` does what the tower's image processor does, from the
  processor's configuration (`preprocessor_config.json` in the model directory, or the defaults
  of the architecture's processor class): resize (`shortest_edge`, or `height`/`width` = squash,
  as SigLIP does), center crop with the processor's offsets, rescale, normalise. Its pixels equal
  the processor's PIL backend (`backend="pil"`, the slow processor LLaVA trained with) bit for
  bit; the default torchvision backend resizes with its own bicubic kernel (<= 2/255 apart).
* open_clip towers: `OpenCLIPTransform` is open_clip's own inference transform built from the
  model's `preprocess_cfg` (`resize_mode` shortest / longest / squash, size, interpolation,
  mean/std, fill colour).

Both first convert the image to RGB the way `seechat.data.images.to_rgb` does (transparency
onto white, as transformers' processors do too) and are picklable, for DataLoader workers.
Their `repr` names every setting, so the feature cache keys on it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from seechat.data.images import to_rgb
from seechat.errors import UserError

# Processor settings that change pixels and that ProcessorTransform does not implement.
_UNSUPPORTED = ("do_pad", "do_image_splitting", "max_num_patches", "patch_size", "do_reduce_labels")
_SIZE_KEYS = ({"shortest_edge"}, {"height", "width"})


class ProcessorTransform:
    """One image -> [3, H, W] float32, as a transformers CLIP/SigLIP image processor makes it.
    `config` is the processor's `to_dict()` (what `preprocessor_config.json` holds)."""

    def __init__(self, config: dict[str, Any]):
        self.config = _clean(config)
        c = self.config
        bad = [k for k in _UNSUPPORTED if c.get(k)]
        size = {k for k, v in (c.get("size") or {}).items() if v is not None}
        if bad or (c.get("do_resize", True) and size not in _SIZE_KEYS):
            what = f"{bad[0]}={c[bad[0]]!r}" if bad else f"size={c.get('size')!r}"
            raise UserError(
                f"image processor {c.get('image_processor_type')}: {what} is not supported by seechat's "
                "fixed-size encoders (supported: size shortest_edge or height+width, optional center crop)"
            )
        self.output_size = self._output_size()

    def _output_size(self) -> tuple[int, int]:
        c = self.config
        if c.get("do_center_crop"):
            return int(c["crop_size"]["height"]), int(c["crop_size"]["width"])
        size = c["size"]
        if "height" in size:
            return int(size["height"]), int(size["width"])
        raise UserError(f"image processor {c.get('image_processor_type')}: size={size!r} without a center crop "
                        "gives images of varying shapes; a fixed-size encoder needs height+width or a crop")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        c = self.config
        image = to_rgb(image)
        if c.get("do_resize", True):
            image = image.resize(_resized(image.width, image.height, c["size"])[::-1], resample=int(c["resample"]))
        if c.get("do_center_crop"):
            image = _center_crop(image, int(c["crop_size"]["height"]), int(c["crop_size"]["width"]))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        if c.get("do_rescale", True):  # as transformers: float64 product, then float32
            x = (x.double() * float(c["rescale_factor"])).float()
        else:
            x = x.float()
        if c.get("do_normalize", True):
            mean = torch.tensor(c["image_mean"], dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(c["image_std"], dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def processor(self):
        """The transformers image processor this transform reproduces (for export)."""
        import transformers

        return getattr(transformers, self.config["image_processor_type"]).from_dict(dict(self.config))

    def __repr__(self) -> str:
        return f"ProcessorTransform({self.config})"


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    """A JSON-like copy (tuples -> lists, the PIL-backend class name -> the processor's name)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    kind = str(out.get("image_processor_type") or "CLIPImageProcessor")
    out["image_processor_type"] = kind[:-3] if kind.endswith("Pil") else kind
    return out


def _resized(width: int, height: int, size: dict[str, Any]) -> tuple[int, int]:
    """(height, width) after the processor's resize (transformers' `get_resize_output_image_size`)."""
    if size.get("height"):
        return int(size["height"]), int(size["width"])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size["shortest_edge"]), int(int(size["shortest_edge"]) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """transformers' center crop: offsets rounded down; an image smaller than the crop is
    first padded with black, centred (pad rounded up before)."""
    if image.height < height or image.width < width:
        h, w = max(height, image.height), max(width, image.width)
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(image, (math.ceil((w - image.width) / 2), math.ceil((h - image.height) / 2)))
        image = canvas
    top, left = (image.height - height) // 2, (image.width - width) // 2
    return image.crop((left, top, left + width, top + height))


def default_processor_config(arch: str, image_size: int) -> dict[str, Any]:
    """The processor a random-init (or processor-less) tower of `arch` gets: that architecture's
    processor class with its defaults at the tower's input size (CLIP: shortest edge + crop;
    SigLIP: squash to S x S)."""
    from transformers import CLIPImageProcessor, Siglip2ImageProcessor, SiglipImageProcessor

    if arch == "siglip2":  # NaFlex: patch_size / max_num_patches (hf.py makes it a fixed grid)
        return Siglip2ImageProcessor().to_dict()
    if arch == "siglip":
        proc = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    return proc.to_dict()


class OpenCLIPTransform:
    """open_clip's inference transform for `preprocess_cfg` (open_clip.image_transform_v2)."""

    def __init__(self, preprocess_cfg: dict[str, Any]):
        from dataclasses import asdict

        from open_clip.transform import PreprocessCfg, image_transform_v2

        fields = PreprocessCfg.__dataclass_fields__
        cfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_cfg.items() if k in fields})
        self.preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
        self.steps = image_transform_v2(cfg, is_train=False)
        size = cfg.size
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.steps(to_rgb(image))

    def processor(self):
        """A transformers image processor with the same pixels, where one can express them."""
        from transformers import CLIPImageProcessor
        from transformers.image_utils import PILImageResampling

        cfg = self.preprocess_cfg
        height, width = self.output_size
        resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
            cfg.get("interpolation", "bicubic"), PILImageResampling.BICUBIC)
        common = dict(resample=resample, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                      image_mean=[float(x) for x in cfg["mean"]], image_std=[float(x) for x in cfg["std"]],
                      do_convert_rgb=True)
        mode = cfg.get("resize_mode", "shortest")
        if mode == "squash":
            return CLIPImageProcessor(do_resize=True, size={"height": height, "width": width},
                                      do_center_crop=False, **common)
        if mode == "shortest" and height == width:
            return CLIPImageProcessor(do_resize=True, size={"shortest_edge": height}, do_center_crop=True,
                                      crop_size={"height": height, "width": width}, **common)
        return None  # "longest" (resize, pad to square): no transformers processor does it

    def __repr__(self) -> str:
        return f"OpenCLIPTransform({self.preprocess_cfg})"
