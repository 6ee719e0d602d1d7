"""`seechat generate-image`: a native model draws what a prompt asks for and writes PNGs; and a
native model's mixed replies (text and images in one answer) with the images saved as files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from seechat.errors import UserError

NOT_NATIVE = ("{model} is a stitched model, and only native (early-fusion) models draw images; "
              "give the directory of a native model (e.g. one trained with recipes/native_easyvqa.yaml)")


def draw_to_files(model_dir: str | os.PathLike, prompt: str, out: str | os.PathLike, n: int = 1,
                  temperature: float = 1.0, top_k: int = 0, seed: int = 0, cfg_scale: float = 1.0) -> list[Path]:
    """Load the saved model at `model_dir`, draw `n` images for `prompt` and write them to `out`
    (with n > 1: `<stem>-<i><suffix>` beside it); returns the paths written. `cfg_scale` is the
    classifier-free guidance scale (1: none; seechat/models/native/sampling.py)."""
    import torch

    from seechat.models.kinds import load

    if cfg_scale <= 0:
        raise UserError(f"--cfg {cfg_scale}: the guidance scale must be > 0 (1: no guidance; 3 is a good start)")
    model = load(model_dir)
    if not hasattr(model, "generate_images"):
        raise UserError(NOT_NATIVE.format(model=model_dir))
    generator = torch.Generator(device=model.device).manual_seed(seed)
    images = model.generate_images([prompt] * n, temperature=temperature, top_k=top_k, generator=generator,
                                   cfg_scale=cfg_scale)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def reply_with_images(model: Any, question: str, images: Sequence[Any], out_dir: str | os.PathLike,
                      max_new_tokens: int = 256, **sampling: Any) -> tuple[str, list[Path]]:
    """A native model's reply that may hold images: the text, with each image written to
    `out_dir/reply-<i>.png` and named in the text as `[image: <path>]` where it was drawn."""
    if not hasattr(model, "mixed_reply"):
        raise UserError(NOT_NATIVE.format(model="the model"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces, paths = [], []
    for part in model.mixed_reply(question, images, max_new_tokens=max_new_tokens, **sampling):
        if isinstance(part, str):
            pieces.append(part.strip())
        else:
            path = out / f"reply-{len(paths)}.png"
            part.save(path)
            paths.append(path)
            pieces.append(f"[image: {path}]")
    return " ".join(p for p in pieces if p), paths
