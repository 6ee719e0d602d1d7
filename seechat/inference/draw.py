"""`seechat generate-image`: a native model draws what a prompt asks for and writes PNGs."""
from __future__ import annotations

import os
from pathlib import Path

from seechat.errors import UserError


def draw_to_files(model_dir: str | os.PathLike, prompt: str, out: str | os.PathLike, n: int = 1,
                  temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[Path]:
    """Load the saved model at `model_dir`, draw `n` images for `prompt` and write them to `out`
    (with n > 1: `<stem>-<i><suffix>` beside it); returns the paths written."""
    import torch

    from seechat.models.kinds import load

    model = load(model_dir)
    if not hasattr(model, "generate_images"):
        raise UserError(f"{model_dir} is a stitched model, and only native (early-fusion) models draw images; "
                        "give the directory of a native model (e.g. one trained with recipes/native_easyvqa.yaml)")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    images = model.generate_images([prompt] * n, temperature=temperature, top_k=top_k, generator=generator)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    for image, path in zip(images, paths):
        image.save(path)
    return paths
