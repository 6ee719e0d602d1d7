"""Tiny experts shared by the tests: built from configs, saved with save_pretrained (or as an
open_clip checkpoint file), and loaded back through the paths users take. Nothing downloaded."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CLIPVisionModel

from seechat.encoders.open_clip import _merge
from seechat.tiny import (
    tiny_clip_vision_config,
    tiny_llm_config,
    tiny_open_clip_overrides,
    train_tokenizer,
)

CORPUS = [
    "What color is the shape? red. What shape is in the image? circle.",
    "Is there a blue triangle in the image? yes. Does the image contain a green rectangle? no.",
    "Describe the picture in detail. A gray square sits next to a teal circle on white.",
] * 20

OPEN_CLIP_NAME = "ViT-B-16"


@pytest.fixture(scope="session")
def experts(tmp_path_factory) -> dict:
    """Paths and encoder configs of tiny experts saved to disk once per session."""
    root = tmp_path_factory.mktemp("experts")
    torch.manual_seed(0)
    tok = train_tokenizer(CORPUS, vocab_size=300, template="chatml")
    tok.save_pretrained(root / "tokenizer")
    paths = {"tokenizer": str(root / "tokenizer")}
    for arch in ("llama", "qwen2"):
        llm = AutoModelForCausalLM.from_config(tiny_llm_config(arch, len(tok), hidden_size=64))
        llm.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        paths[arch] = str(root / arch)
    # A QLoRA-sized LM: wide enough that 4-bit blocks dominate the quantisation metadata.
    llm = AutoModelForCausalLM.from_config(tiny_llm_config("llama", len(tok), hidden_size=256, heads=4))
    llm.save_pretrained(root / "llama256")
    tok.save_pretrained(root / "llama256")
    paths["llama256"] = str(root / "llama256")

    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(root / "clip_vision")
    paths["hf_encoder"] = {"backend": "hf", "name": str(root / "clip_vision"), "pretrained": True}

    overrides = tiny_open_clip_overrides()
    base = open_clip.get_model_config(OPEN_CLIP_NAME)
    kwargs = {k: _merge(base[k], v) if isinstance(v, dict) else v for k, v in overrides.items()}
    clip = open_clip.create_model(OPEN_CLIP_NAME, pretrained=None, **kwargs)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "open_clip.safetensors")
    paths["open_clip_encoder"] = {
        "backend": "open_clip",
        "name": OPEN_CLIP_NAME,
        "pretrained": str(root / "open_clip.safetensors"),
        "config": overrides,
    }
    return paths


ADAPTERS = {
    "mlp": {"type": "mlp", "projector": "mlp2x_gelu"},
    "qformer": {
        "type": "qformer",
        "num_queries": 8,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 64,
    },
    "resampler": {"type": "resampler", "grid_size": 4},
}


def model_config(experts: dict, encoder: str = "hf", adapter: str = "mlp", llm: str = "llama", **llm_extra) -> dict:
    return {
        "encoder": copy.deepcopy(experts[f"{encoder}_encoder"]),
        "adapter": copy.deepcopy(ADAPTERS[adapter]),
        "llm": {"name_or_path": experts[llm], **llm_extra},
    }


def image_batch(model, n_text: int = 3):
    """Two samples: one with an image between text, one text-only; labels on the text tail."""
    img, n = model.image_token_id, model.num_image_tokens
    a = [10, 11, 12] + [img] * n + [20, 21, 22, 23]
    b = [10, 11, 12, 13, 14] + [30] * n + [24, 25]
    ids = torch.tensor([a, b])
    labels = ids.clone()
    labels[:, : len(a) - 2] = -100
    generator = torch.Generator().manual_seed(0)
    size = model.encoder.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, size, size, generator=generator),
        "num_images": torch.tensor([1, 0]),
        "labels": labels,
    }
