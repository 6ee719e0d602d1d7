"""Tiny saved seechat models for the export / merge / chat / serve tests: built from the session's
tiny experts, with every trainable weight (adapter, LoRA A and B) randomised so that a wrong
merge or a wrong weight mapping changes the outputs."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from conftest import model_config
from seechat import build_model

DEFAULT_MODES = {"encoder": "frozen", "adapter": "full", "llm": "lora"}


def saved_model(experts: dict, out: Path, encoder: str = "hf", llm: str = "llama", modes: dict | None = None,
                encoder_cfg: dict | None = None, adapter_cfg: dict | None = None, seed: int = 0) -> Path:
    """Build, randomise the trainable weights, save to `out`; returns `out`."""
    cfg = model_config(experts, encoder, "mlp", llm)
    cfg["encoder"].update(encoder_cfg or {})
    cfg["adapter"].update(adapter_cfg or {})
    torch.manual_seed(seed)
    model = build_model(cfg, modes or DEFAULT_MODES)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


def shape_image(color=(200, 30, 30), size=(48, 40)) -> Image.Image:
    """A non-square picture (so the transform's resize and crop both act) with one ellipse."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse([5, 5, 30, 35], fill=color)
    return image
