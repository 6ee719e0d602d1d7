"""`seechat generate-image`: a native model draws what a prompt asks for and writes PNGs."""
from __future__ import annotations

import argparse
from pathlib import Path


def _generate_image(args: argparse.Namespace) -> int:
    import torch

    from seechat.models.kinds import load

    model = load(args.model)
    if not hasattr(model, "generate_images"):
        raise SystemExit(f"{args.model} is a stitched model; only native (model.kind: native) models draw images")
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    images = model.generate_images([args.prompt] * args.n, temperature=args.temperature, top_k=args.top_k,
                                   generator=generator)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(args.n)]
    for image, path in zip(images, paths):
        image.save(path)
        print(path)
    return 0


def add_generate_image_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate-image", help="draw an image from a prompt with a native (early-fusion) model")
    p.add_argument("--model", required=True, help="saved native seechat model directory")
    p.add_argument("prompt", help='what to draw, e.g. "draw a red circle"')
    p.add_argument("--out", required=True, help="PNG path (with --n > 1: name-<i>.png)")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate_image)
