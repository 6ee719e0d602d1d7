"""The command-line side of training on your own data: `seechat experts`, `seechat data check`
and `seechat eval --compare`. Light on purpose (argparse only): `seechat --help` builds these
parsers, and each handler imports what it needs when it runs (seechat/cli.py wires them in).
"""
from __future__ import annotations

import argparse
import json

from seechat.errors import UserError


def compare_or_refuse(args: argparse.Namespace) -> int:
    """`seechat eval --compare A B`; without it, --model and --data are required."""
    if not args.compare:
        flag = "--model" if args.model is None else "--data"
        raise UserError(f"{flag} is required (or give --compare A B to compare two evaluations)")
    from seechat.inference.breakdown import format_comparison, read_summary

    a, b = (read_summary(p) for p in args.compare)
    print(format_comparison(a, b, names=tuple(args.compare)))
    return 0


def run_experts(args: argparse.Namespace) -> int:
    from seechat.tools.experts.build import build_experts

    info = build_experts(args.data, args.out, image_root=args.image_root, size=args.size, seed=args.seed,
                         max_samples=args.max_samples, vision_epochs=args.vision_epochs,
                         llm_epochs=args.llm_epochs, val=args.val, test=args.test)
    print(json.dumps(info["seconds"]))
    print(f"experts in {args.out}; next:\n  seechat train --config {info['recipes']['align']}\n"
          f"  seechat train --config {info['recipes']['finetune']}")
    return 0


def run_data(args: argparse.Namespace) -> int:
    from seechat.config import load_recipe
    from seechat.training.data_check import check_data, format_check

    report = check_data(load_recipe(args.config, args.overrides), split=args.split)
    print(format_check(report))
    return 1 if report["problems"] else 0


def experts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training LLaVA JSON/JSONL (the experts learn from it alone)")
    p.add_argument("--out", required=True, help="directory for tokenizer/, vision/, llm/ and the recipes")
    p.add_argument("--image-root", default=None, help="where relative image paths start (default: the data file's directory)")
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="preset (default: small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help="learn from the first N records")
    p.add_argument("--vision-epochs", type=int, default=None, help="instead of the preset's")
    p.add_argument("--llm-epochs", type=int, default=None, help="instead of the preset's")
    p.add_argument("--val", default=None, help="data.val of the written recipes")
    p.add_argument("--test", default=None, help="data.test of the written recipes")


def data_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    check = sub.add_parser("check", help="read the training data the way training will; exit 1 on problems",
                           description="Counts, lengths, image sizes, supervised tokens and one rendered "
                                       "sample; exits 1 when the data would waste a run.")
    check.add_argument("--config", required=True, help="recipe YAML")
    check.add_argument("--split", default="train", choices=["train", "val", "test"])
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=256")
