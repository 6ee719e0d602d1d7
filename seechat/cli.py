"""The `seechat` command: train, eval, chat. `seechat <command> --help` for each."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


def _train(args: argparse.Namespace) -> int:
    from seechat.config import load_recipe
    from seechat.inference.evaluate import evaluate_file
    from seechat.training.loop import run

    if args.config is None:  # the embedded default: easy-VQA with tiny local experts
        from seechat import resources
        from seechat.experiments.easyvqa.pipeline import demo_paths, ensure_default_inputs

        ensure_default_inputs()
        args.config = str(resources.recipe_file(f"easyvqa_{args.stage or 'align'}.yaml"))
        args.overrides = [*demo_paths(args.stage or "align"), *args.overrides]
    recipe = load_recipe(args.config, args.overrides)
    if args.stage and recipe["stage"] != args.stage:
        print(f"note: {args.config} is a {recipe['stage']!r} recipe, run with recipes/{args.stage}.py")
    summary = run(recipe, resume=args.resume, evaluate=evaluate_file)  # evaluate: data.val
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seechat.inference.evaluate import evaluate_to_dir
    from seechat.models.kinds import load

    model = load(args.model)
    # Beside the model, not in it: a model directory is replaced whole when saved again,
    # and may be read-only (a shared or downloaded checkpoint).
    where = Path(args.model).resolve()  # (".": the directory's own name, not an empty one)
    output_dir = args.output_dir or where.with_name(f"{where.name}-eval") / Path(args.data).stem
    result = evaluate_to_dir(
        model, args.data, output_dir, predictions_path=args.predictions, model_dir=args.model,
        image_root=args.image_root, max_samples=args.max_samples,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps(result))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from seechat.inference.chat import one_shot, repl
    from seechat.models.kinds import load

    if args.question and args.question_flag:
        raise SystemExit("seechat chat: give the question either positionally or with --question, not both")
    question = args.question or args.question_flag
    model = load(args.model)
    if question:
        one_shot(model, question, args.image, max_new_tokens=args.max_new_tokens)
        return 0
    return repl(model, args.image, max_new_tokens=args.max_new_tokens)


def _export(args: argparse.Namespace) -> int:
    from seechat.tools.export import export_llava_hf

    out = export_llava_hf(args.model, args.out)
    print(f"exported {args.model} to {out} ({args.to}); load it with LlavaForConditionalGeneration + AutoProcessor")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from seechat.tools.merge import merge_model

    out = merge_model(args.model, args.out)
    print(f"merged LoRA of {args.model} into a standalone checkpoint at {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from seechat.inference.serve import serve

    serve(args.model, host=args.host, port=args.port, model_name=args.model_name, image_dir=args.image_dir,
          max_new_tokens=args.max_new_tokens)
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (default: the easy-VQA align recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 adapter=qformer")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="seechat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train per a recipe (align or finetune)")
    add_train_arguments(p)
    p.set_defaults(func=_train, stage=None)

    p = sub.add_parser("eval", help="VQA exact-match accuracy of a saved model on a LLaVA JSON file")
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("--data", required=True, help="LLaVA JSON/JSONL with question/answer turns")
    p.add_argument("--image-root", default=None)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--output-dir", default=None,
                   help="where predictions.jsonl and summary.json go (default: MODEL-eval/<data file name>, beside MODEL)")
    p.add_argument("--predictions", default=None, help="write predictions.jsonl here instead")
    p.set_defaults(func=_eval)

    p = sub.add_parser("chat", help="ask a saved model about images: one question, or an interactive session")
    p.add_argument("--model", required=True)
    p.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    p.add_argument("question", nargs="?", default=None, help="one question (default: interactive session)")
    p.add_argument("--question", dest="question_flag", default=None, help="the question, as a flag")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=_chat)

    p = sub.add_parser("export", help="export a saved model to another format (llava-hf: transformers' Llava)")
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("--to", required=True, choices=["llava-hf"], help="target format")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_export)

    p = sub.add_parser("merge", help="merge LoRA weights into a standalone checkpoint")
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_merge)

    from seechat.tools.estimate import add_estimate_parser

    add_estimate_parser(sub)  # seechat/tools/estimate.py

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the directory's name)")
    p.add_argument("--image-dir", default=None, help="allow local image paths inside this directory")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length: the default and the cap on what a request may ask for")
    p.set_defaults(func=_serve)

    from seechat.experiments.compare import add_compare_parser
    from seechat.inference.draw import add_generate_image_parser

    add_generate_image_parser(sub)  # seechat/inference/draw.py
    add_compare_parser(sub)  # seechat/experiments/compare.py

    args = parser.parse_args(argv)
    return args.func(args)


def train_main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry of recipes/align.py and recipes/finetune.py."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=f"seechat {stage} stage")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    args.stage = stage
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
