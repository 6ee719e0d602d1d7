"""The recipe pair `seechat experts` writes beside the experts: align (the adapter alone), then
finetune (adapter + LM), the easy-VQA default's settings, with every path relative to the
recipe file so the directory can move together with the data."""
from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

ALIGN_STEPS = 200  # enough to map a 16-patch tower onto the caption words (digits: see docs/data.md)
FINETUNE_MIN_STEPS = 200


def _rel(path: str, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), start.resolve())


def write_recipes(out: Path, data: str, image_root: str | None, val: str | None = None, test: str | None = None,
                  seed: int = 0, images: bool = True, n_samples: int = 0, batch_size: int = 64,
                  pixel_shuffle: int = 1) -> dict[str, Path]:
    """`out/align.yaml` and `out/finetune.yaml`; returns their paths. `pixel_shuffle`: the
    adapter's (the tower's patch-grid side folds all its patches into one token)."""
    steps_per_epoch = max(1, math.ceil(n_samples / batch_size))
    finetune_epochs = max(1, math.ceil(FINETUNE_MIN_STEPS / steps_per_epoch))
    encoder = {"backend": "hf", "name": "vision", "pretrained": True, "feature_layer": -1, "keep_cls": True,
               "config": {"attn_implementation": "eager"}}
    data_cfg = {"train": _rel(data, out), **({"val": _rel(val, out)} if val else {}),
                **({"test": _rel(test, out)} if test else {}),
                **({"image_root": _rel(image_root, out)} if image_root else {}),
                "max_length": 512, "num_workers": 1, "group_by_length": False}
    adapter = {"card": "mlp2x_gelu", **({"pixel_shuffle": pixel_shuffle} if images and pixel_shuffle > 1 else {})}
    align = {
        "stage": "align", "seed": seed, "output_dir": "runs/align",
        "model": {**({"encoder": encoder} if images else {}), "adapter": adapter,
                  "llm": {"name_or_path": "llm", "attn_implementation": "eager"}},
        "data": data_cfg,
        "train": {"epochs": max(1, math.ceil(ALIGN_STEPS / steps_per_epoch)), "max_steps": ALIGN_STEPS,
                  "batch_size": batch_size, "lr": 2.0e-3, "warmup_ratio": 0.05, "log_every": 10},
        "eval": {"batch_size": 128, "max_new_tokens": 8},
    }
    finetune = {
        "inherit": "align.yaml", "stage": "finetune", "output_dir": "runs/finetune",
        "model": {"init_from": "runs/align/final", "llm": {"lr": 2.0e-4}},
        "train": {"epochs": finetune_epochs, "max_steps": None, "lr": 1.0e-3},
    }
    head = ("# Written by `seechat experts` with the experts beside it; paths are relative to this file.\n"
            "# accelerate launch recipes/{}.py --config {}  (or: seechat train --config {})\n")
    paths = {"align": out / "align.yaml", "finetune": out / "finetune.yaml"}
    for name, recipe in (("align", align), ("finetune", finetune)):
        text = head.format(name, paths[name], paths[name]) + yaml.safe_dump(recipe, sort_keys=False)
        paths[name].write_text(text)
    return paths
