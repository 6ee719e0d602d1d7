"""The `seechat` command: train, eval, chat, export, merge, serve, estimate, generate-image,
compare, experts, data check. `seechat VERB --help` for each.

Building the parser imports nothing heavy: torch, transformers, peft, accelerate, open_clip and
fastapi load inside the verb that needs them, so `--help` answers at once. A mistake in the
user's input (a `seechat.errors.UserError`, a path that does not exist, an output directory
seechat may not replace, a damaged weights file) ends in one line on stderr and exit status 2;
anything else is a bug and keeps its traceback. `seechat --debug VERB ...` shows the traceback
of either.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Sequence

from seechat.errors import UserError
from seechat.tools import own_data_cli  # light: argparse only, each handler imports what it needs

USER_ERROR_STATUS = 2  # argparse's status for a bad command line: the same kind of mistake
# `seechat estimate --dtype` (seechat.tools.estimate.DTYPE_BYTES; tests/test_cli.py keeps them equal)
ESTIMATE_DTYPES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")
# The standard library's errors that, about a path the user gave, mean a mistake in it.
PATH_FIXES = {FileNotFoundError: "check the path", FileExistsError: "give a path that does not exist yet",
              IsADirectoryError: "give a file, not a directory", NotADirectoryError: "give a directory",
              PermissionError: "give a path you may read and write"}
COMPARE_DESCRIPTION = """\
Every path - MLP projector, Q-Former, resampler, native early fusion - trained on the same
easy-VQA data under the same training-time budget, scored on the same test split
(seechat/experiments/compare.py says how the budget is shared).

    seechat compare                                   # recipes/compare.yaml: every path x 3 seeds, all test questions
    seechat compare --quick                           # smoke run (about a minute of training)
    seechat compare budget_seconds=20 eval_samples=300 output_dir=runs/compare_smoke results_dir=runs/compare_smoke

Writes <results_dir>/compare.json, compare.md (table) and compare.png.
"""


def _saved_model(directory: str) -> str:
    """`directory`, checked to be a saved seechat model before anything heavy loads."""
    from seechat.models.saved import read_meta

    read_meta(directory)
    return directory


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
    if args.compare or args.model is None or args.data is None:
        return own_data_cli.compare_or_refuse(args)
    _saved_model(args.model)
    from seechat.data import SampleError
    from seechat.inference.breakdown import format_report
    from seechat.inference.evaluate import evaluate_to_dir
    from seechat.models.kinds import load

    model = load(args.model)
    # Beside the model, not in it: a model directory is replaced whole when saved again,
    # and may be read-only (a shared or downloaded checkpoint).
    where = Path(args.model).resolve()  # (".": the directory's own name, not an empty one)
    output_dir = args.output_dir or where.with_name(f"{where.name}-eval") / Path(args.data).stem
    image_root = args.image_root or str(Path(args.data).resolve().parent)  # relative to the data file
    try:
        result = evaluate_to_dir(
            model, args.data, output_dir, predictions_path=args.predictions, model_dir=args.model,
            image_root=image_root, max_samples=args.max_samples,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        )
    except SampleError as err:
        raise UserError(f"{str(err).replace('; relative path: set image_root', '')} (images are looked up under "
                        f"--image-root {image_root}; pass --image-root DIR)") from err
    print(format_report(result))
    print(f"summary: {Path(output_dir) / 'summary.json'}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    if args.question and args.question_flag:
        raise UserError("give the question either positionally or with --question, not both")
    for image in args.image:  # before the model loads: a typo should not cost the load
        if "://" not in image and not Path(image).is_file():
            raise UserError(f"--image {image}: no such image file; give the path of an existing image")
    _saved_model(args.model)
    from seechat.inference.chat import one_shot, repl
    from seechat.models.kinds import load

    question = args.question or args.question_flag
    model = load(args.model)
    if question:
        one_shot(model, question, args.image, max_new_tokens=args.max_new_tokens, images_dir=args.save_images)
        return 0
    return repl(model, args.image, max_new_tokens=args.max_new_tokens)


def _export(args: argparse.Namespace) -> int:
    _saved_model(args.model)
    if args.to == "gguf":
        from seechat.tools.export_gguf import export_gguf_command
        return export_gguf_command(args.model, args.out, args.gguf_type)
    from seechat.tools.export import export_llava_hf

    out = export_llava_hf(args.model, args.out)
    print(f"exported {args.model} to {out} ({args.to}); load it with LlavaForConditionalGeneration + AutoProcessor")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from seechat.models.saved import META, check_output_dir

    _saved_model(args.model)
    check_output_dir(args.out, META)  # refused now, not after the load and the merge
    from seechat.tools.merge import merge_model

    out = merge_model(args.model, args.out)
    print(f"merged LoRA of {args.model} into a standalone checkpoint at {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    _saved_model(args.model)
    from seechat.inference.serve import serve
    from seechat.inference.serve.options import limits_from

    serve(args.model, host=args.host, port=args.port, model_name=args.model_name, image_dir=args.image_dir,
          limits=limits_from(args), keys=tuple(args.api_key), insecure_no_auth=args.insecure_no_auth,
          allowed_hosts=tuple(args.allowed_host), docs=args.docs)
    return 0


def _webui(args: argparse.Namespace) -> int:
    for model_dir in args.model:
        _saved_model(model_dir)
    from seechat.inference.webui import webui

    webui(args.model, host=args.host, port=args.port, max_new_tokens=args.max_new_tokens)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from seechat.config import load_recipe
    from seechat.tools.estimate import estimate, fits, format_estimate

    result = estimate(load_recipe(args.config, args.overrides), dtype=args.dtype, batch=args.batch,
                      seq_len=args.seq_len, supervised=args.supervised, device=args.device)
    print(format_estimate(result))
    if args.gpu_gib:
        verdict = "fits" if fits(result, args.gpu_gib) else "does NOT fit"
        print(f"{verdict} in {args.gpu_gib:g} GiB (framework overhead such as the CUDA context, ~0.5-1 GiB, not included)")
    return 0


def _generate_image(args: argparse.Namespace) -> int:
    _saved_model(args.model)
    from seechat.inference.draw import draw_to_files

    for path in draw_to_files(args.model, args.prompt, args.out, n=args.n, temperature=args.temperature,
                              top_k=args.top_k, seed=args.seed, cfg_scale=args.cfg):
        print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from seechat.experiments.compare import load_compare_config, main_run

    results = main_run(load_compare_config(args.config, args.overrides, quick=args.quick))
    print((Path(results["config"]["results_dir"]) / "compare.md").read_text())
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (default: the easy-VQA align recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 adapter=qformer")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="saved seechat model directory")
    p.add_argument("--data", help="LLaVA JSON/JSONL with question/answer turns")
    p.add_argument("--image-root", default=None, help="where relative image paths start (default: the data file's directory)")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--output-dir", default=None,
                   help="where predictions.jsonl and summary.json go (default: MODEL-eval/<data file name>, beside MODEL)")
    p.add_argument("--predictions", default=None, help="write predictions.jsonl here instead")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="print two evaluations (output directories or summary.json files) side by side")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    p.add_argument("question", nargs="?", default=None, help="one question (default: interactive session)")
    p.add_argument("--question", dest="question_flag", default=None, help="the question, as a flag")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="native models: the reply may hold images; write them to DIR (named in the text)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("--to", required=True, choices=["llava-hf", "gguf"], help="llava-hf (Llava, vLLM) or gguf (llama.cpp)")
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "q8_0"], help="GGUF weight type (default f16)")
    p.add_argument("out", help="output directory")


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved seechat model directory")
    p.add_argument("out", help="output directory")


def _estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--dtype", default=None, choices=ESTIMATE_DTYPES,
                   help="weight storage dtype (default: the recipe's encoder/llm dtype, else fp32)")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sample (default: image tokens + 128, at most data.max_length)")
    p.add_argument("--supervised", type=int, default=None, help="supervised tokens per sample (default: half the text)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where it trains (default: cuda)")
    p.add_argument("--gpu-gib", type=float, default=None, help="also say whether it fits this many GiB")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. llm.gradient_checkpointing=true")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from seechat.inference.serve.options import add_serve_arguments  # light: no server import

    add_serve_arguments(p)


def _webui_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, action="append",
                   help="saved seechat model directory; repeat it to show models side by side")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=64)


def _generate_image_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved native seechat model directory")
    p.add_argument("prompt", help='what to draw, e.g. "draw a red circle"')
    p.add_argument("--out", required=True, help="PNG path (with --n > 1: name-<i>.png)")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest codes (0: all)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: none; e.g. 3)")
    p.add_argument("--seed", type=int, default=0)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="comparison config (default: the recipes/compare.yaml seechat ships)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget_seconds=60 eval_samples=500 seeds=[0] "
                                                "experts=runs/demo/experts paths.native.overrides=[train.lr=1e-3]")
    p.add_argument("--quick", action="store_true", help="smoke run: every path and step at a tiny budget, one seed "
                                                        "(output in runs/compare_quick)")


# verb -> (help, its arguments, what it runs)
VERBS = {
    "train": ("train per a recipe (align or finetune)", add_train_arguments, _train),
    "eval": ("VQA exact-match accuracy of a saved model on a LLaVA JSON file", _eval_arguments, _eval),
    "chat": ("ask a saved model about images: one question, or an interactive session", _chat_arguments, _chat),
    "export": ("export a saved model to another format (llava-hf: transformers' Llava)", _export_arguments, _export),
    "merge": ("merge LoRA weights into a standalone checkpoint", _merge_arguments, _merge),
    "estimate": ("training memory per module (weights, grads, optimizer, activations)", _estimate_arguments,
                 _estimate),
    "serve": ("OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)", _serve_arguments, _serve),
    "webui": ("a web page (Gradio) to ask one or more saved models about an image; native ones also draw",
              _webui_arguments, _webui),
    "generate-image": ("draw an image from a prompt with a native (early-fusion) model", _generate_image_arguments,
                       _generate_image),
    "compare": ("train MLP / Q-Former / resampler / native under one time budget; compare them on easy-VQA",
                _compare_arguments, _compare),
    "experts": ("train offline experts (tokenizer, vision tower, LM) on your data; writes recipes",
                own_data_cli.experts_arguments, own_data_cli.run_experts),
    "data": ("data check: read the training set the way training will and report problems",
             own_data_cli.data_arguments, own_data_cli.run_data),
}
DESCRIPTIONS = {"compare": COMPARE_DESCRIPTION}


def build_parser() -> argparse.ArgumentParser:
    """The `seechat` parser with every verb (imports nothing beyond the standard library)."""
    parser = argparse.ArgumentParser(prog="seechat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb, (help_text, arguments, run) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=DESCRIPTIONS.get(verb, help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(func=run, stage=None)
    return parser


def _damaged_weights_file(error: BaseException) -> str | None:
    """The file safetensors was reading when it raised `error` (its `load_file(filename)` or
    `safe_open(filename)` frame), if any."""
    found, tb = None, error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if "safetensors" in Path(frame.f_code.co_filename).parts and "filename" in frame.f_locals:
            found = str(frame.f_locals["filename"])
        tb = tb.tb_next
    return found


def user_error_message(error: BaseException) -> str | None:
    """What to tell the user when their input caused `error`; None when it is a bug."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, tuple(PATH_FIXES)):
        if error.filename is None:  # worded by seechat (e.g. saved.check_output_dir's refusal)
            return str(error)
        fix = next(fix for kind, fix in PATH_FIXES.items() if isinstance(error, kind))
        return f"{error.filename}: {(error.strerror or type(error).__name__).lower()}; {fix}"
    safetensors = sys.modules.get("safetensors")  # (raised by it only if it was imported)
    if safetensors is not None and isinstance(error, safetensors.SafetensorError):
        file = _damaged_weights_file(error) or "a safetensors weights file"
        return f"{file} is damaged or truncated ({error}); save the model again, or copy it again from where it came"
    # A DataLoader worker's error arrives re-raised by torch as a RuntimeError holding the
    # worker's traceback; its last line is the original error.
    caught = re.match(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback", str(error))
    if isinstance(error, RuntimeError) and caught:
        last = str(error).rstrip().splitlines()[-1]
        qualified, _, message = last.partition(": ")
        module, _, name = qualified.rpartition(".")
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, UserError):
            return message
    return None


def _run(args: argparse.Namespace, command: str) -> int:
    """Run the verb; a user's mistake ends in one line on stderr and USER_ERROR_STATUS."""
    try:
        return args.func(args)
    except Exception as error:
        message = None if args.debug else user_error_message(error)
        if message is None:
            raise
        print(f"{command}: error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS


def _quiet_known_noise() -> None:
    # bitsandbytes logs a warning at import on every CPU-only machine (its optional 4-bit CPU
    # kernels are missing; with HF_HUB_OFFLINE `kernels` adds that it skips their trust check);
    # QLoRA needs a GPU anyway, and neither warning says anything to act on.
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_known_noise()
    args = build_parser().parse_args(argv)
    return _run(args, f"seechat {args.command}")


def train_main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry of recipes/align.py and recipes/finetune.py."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_known_noise()
    parser = argparse.ArgumentParser(prog=f"recipes/{stage}.py", description=f"seechat {stage} stage")
    add_train_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = parser.parse_args(argv)
    args.stage, args.func = stage, _train
    return _run(args, f"recipes/{stage}.py")


if __name__ == "__main__":
    sys.exit(main())
