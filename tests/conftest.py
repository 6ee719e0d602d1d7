"""Tiny experts shared by the tests: built from configs, saved with save_pretrained (or as an
open_clip checkpoint file), and loaded back through the paths users take. Nothing downloaded."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CLIPVisionModel

from seechat.models.encoders.open_clip import _merge
from seechat.experiments.tiny import (
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


COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


@pytest.fixture(scope="session")
def tiny_vqa(tmp_path_factory) -> dict:
    """A small LLaVA-format VQA set on disk: colored shapes and 'what color' questions, plus
    a multi-turn two-image sample and a text-only sample."""
    import json

    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    samples = []
    for i in range(24):
        color = list(COLORS)[i % 3]
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).rectangle([6 + i % 5, 6, 24, 24 - i % 4], fill=COLORS[color])
        image.save(root / "images" / f"{i}.png")
        samples.append({
            "id": f"q{i}",
            "image": f"images/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the shape?"},
                {"from": "gpt", "value": color},
            ],
        })
    samples.append({
        "id": "two-images",
        "images": ["images/0.png", "images/1.png"],
        "conversations": [
            {"from": "human", "value": "<image> and <image>: what colors?"},
            {"from": "gpt", "value": "red and blue"},
            {"from": "human", "value": "Is the first one red?"},
            {"from": "gpt", "value": "yes"},
        ],
    })
    samples.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "green"}]})
    (root / "train.json").write_text(json.dumps(samples))
    (root / "test.json").write_text(json.dumps(samples[:24]))
    return {"root": str(root), "train": str(root / "train.json"), "test": str(root / "test.json")}


def tiny_recipe(experts: dict, data: dict, out: str, *extra: str) -> dict:
    """A resolved recipe over the tiny experts and data, with `extra` dotted overrides."""
    import yaml

    from seechat.config import load_recipe

    path = f"{out}.recipe.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({
            "stage": "align",
            "output_dir": out,
            "model": model_config(experts, "hf", "mlp", "qwen2"),
            "data": {"train": data["train"], "test": data["test"], "image_root": data["root"], "num_workers": 0},
            "train": {"batch_size": 4, "lr": 3e-3, "max_steps": 6, "log_every": 1, "trackers": [],
                      "mixed_precision": "no", "warmup_ratio": 0.0},
        }, f)
    return load_recipe(path, list(extra))
