"""The `seechat` command line: every `--help` answers without importing the heavy libraries, and
a mistake in the user's input ends in one line on stderr naming the input, exit status 2 and no
traceback, while `--debug` shows the traceback (and a bug keeps its traceback always).

Cheap cases (a mistake found before torch loads) run the real command in a subprocess; the others
call `seechat.cli.main` in this process, which is the same code path below the interpreter."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seechat import cli
from seechat.config import RecipeError
from seechat.cli import VERBS, main, train_main
from vlm_helpers import saved_model

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HEAVY = ("torch", "transformers", "peft", "accelerate", "open_clip", "fastapi", "safetensors", "numpy")
# Runs the command as `python -m seechat.cli ARGS` would, then reports which heavy libraries loaded.
HELP_PROBE = """
import json, runpy, sys
sys.argv = ["seechat", *sys.argv[1:]]
try:
    runpy.run_module("seechat.cli", run_name="__main__")
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (HEAVY,)


def run(*args: str, module: str = "seechat.cli", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env={**ENV, **env}, cwd=REPO_ROOT, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, first_line: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == first_line


@pytest.mark.parametrize("verb", ["", *VERBS])
def test_help_imports_nothing_heavy(verb):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *([verb] if verb else []), "--help"],
                          capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=60)
    *help_text, report = proc.stdout.splitlines()
    assert json.loads(report) == {"code": 0, "heavy": []}, proc.stderr
    assert help_text[0].startswith(f"usage: seechat {verb}".rstrip())


def test_every_verb_is_listed_and_estimate_dtypes_match():
    from seechat.tools.estimate import DTYPE_BYTES

    assert list(VERBS) == ["train", "eval", "chat", "export", "merge", "estimate", "serve", "webui", "generate-image",
                           "compare", "experts", "data"]
    assert list(cli.ESTIMATE_DTYPES) == sorted(DTYPE_BYTES)


@pytest.mark.parametrize("verb", ["eval", "chat", "serve"])
def test_missing_model_dir_subprocess(verb, tmp_path):
    missing = tmp_path / "nowhere"
    extra = {"eval": ["--data", str(tmp_path / "test.json")], "chat": ["hello"], "serve": []}[verb]
    first = f"seechat {verb}: error: {missing}: no such model directory (give the directory a run saved, e.g. RUN/final)"
    assert_user_error(run(verb, "--model", str(missing), *extra), first)
    debug = run("--debug", verb, "--model", str(missing), *extra)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().endswith(f"ModelDirError: {first.split(': error: ')[1]}")


@pytest.fixture(scope="module")
def plain_model(experts, tmp_path_factory):
    return saved_model(experts, tmp_path_factory.mktemp("cli") / "plain")


def test_merge_into_a_directory_that_is_not_seechats(plain_model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    first = (f"seechat merge: error: {mine} exists and is not an earlier seechat output (no seechat.json in it); "
             "refusing to replace it. Give a new or empty directory.")
    assert_user_error(run("merge", "--model", str(plain_model), str(mine)), first)
    assert "Traceback" in run("--debug", "merge", "--model", str(plain_model), str(mine)).stderr
    assert (mine / "notes.txt").read_text() == "keep"


def bad_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"inherit": str(REPO_ROOT / "recipes" / "easyvqa_align.yaml"),
                                    "train": {"lrr": 1.0}}))
    return path


BAD_KEY = r"unknown key 'train\.lrr' in train; did you mean 'lr'\? \(valid: .*\)"


def test_accelerate_entry_point_ends_user_errors_in_one_line(tmp_path):
    """recipes/align.py under the documented launch (recipes/accelerate/cpu.yaml): no notice of
    accelerate's defaults, no traceback, the recipe's mistake on one line."""
    recipe = bad_recipe(tmp_path)
    launch = run("-q", "--config_file", str(REPO_ROOT / "recipes" / "accelerate" / "cpu.yaml"),
                 str(REPO_ROOT / "recipes" / "align.py"), "--config", str(recipe),
                 module="accelerate.commands.launch", OMP_NUM_THREADS="1")
    assert launch.returncode == 1  # accelerate's launcher: 1 for any failed script
    assert "were not passed" not in launch.stderr and "Traceback" not in launch.stderr
    assert re.fullmatch(rf"recipes/align\.py: error: {BAD_KEY}", launch.stderr.strip()), launch.stderr
    with pytest.raises(RecipeError, match="train.lrr"):
        train_main("align", ["--debug", "--config", str(recipe)])
    assert train_main("finetune", ["--config", str(recipe)]) == 2


def assert_main_user_error(capsys, argv: list[str], line: str, error: type) -> None:
    """`seechat ARGV` returns 2 and its last word on stderr is the one line `line` (a regex;
    what came before is transformers' loading progress), no traceback; `seechat --debug ARGV`
    lets the `error` through (Python prints its traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    told = [line for line in err.splitlines() if line.startswith(f"seechat {argv[0]}: ")]
    assert len(told) == 1 and re.fullmatch(line, told[0]) and err.endswith(told[0] + "\n"), err
    with pytest.raises(error):
        main(["--debug", *argv])


def test_train_with_a_bad_recipe_key(capsys, tmp_path):
    assert_main_user_error(capsys, ["train", "--config", str(bad_recipe(tmp_path))],
                           rf"seechat train: error: {BAD_KEY}", RecipeError)


def test_estimate_with_a_bad_recipe(capsys, tmp_path):
    assert_main_user_error(capsys, ["estimate", "--config", str(bad_recipe(tmp_path))],
                           rf"seechat estimate: error: {BAD_KEY}", RecipeError)
    missing = tmp_path / "nope.yaml"
    assert_main_user_error(capsys, ["estimate", "--config", str(missing)],
                           re.escape(f"seechat estimate: error: recipe {missing} does not exist"), RecipeError)


def test_compare_with_a_bad_config(capsys, tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((REPO_ROOT / "recipes" / "compare.yaml").read_text()),
                                      "budget_second": 5}))
    assert_main_user_error(capsys, ["compare", "--config", str(config)],
                           r"seechat compare: error: unknown compare key\(s\) \['budget_second'\]; valid: .*",
                           RecipeError)
    missing = tmp_path / "nope.yaml"
    assert_main_user_error(capsys, ["compare", "--config", str(missing)],
                           re.escape(f"seechat compare: error: {missing}: no such file or directory; check the path"),
                           FileNotFoundError)


def test_export_of_an_adapter_llava_cannot_express(capsys, experts, tmp_path):
    from seechat.tools.clip_convert import NotExpressibleError

    shuffled = saved_model(experts, tmp_path / "shuffled", adapter_cfg={"pixel_shuffle": 2})
    assert_main_user_error(capsys, ["export", "--model", str(shuffled), "--to", "llava-hf", str(tmp_path / "out")],
                           re.escape("seechat export: error: adapter.pixel_shuffle=2: transformers' Llava has no "
                                     "pixel shuffle (space-to-depth) step before its projector, so this model "
                                     "cannot be written as llava-hf; export a model trained with pixel_shuffle: 1"),
                           NotExpressibleError)
    assert not (tmp_path / "out").exists()


def test_generate_image_with_a_stitched_model(capsys, plain_model, tmp_path):
    from seechat.errors import UserError

    assert_main_user_error(capsys, ["generate-image", "--model", str(plain_model), "draw", "--out",
                                    str(tmp_path / "x.png")],
                           re.escape(f"seechat generate-image: error: {plain_model} is a stitched model, and only "
                                     "native (early-fusion) models draw images; give the directory of a native model "
                                     "(e.g. one trained with recipes/native_easyvqa.yaml)"), UserError)


def test_chat_with_a_corrupt_adapter_file(capsys, experts, tmp_path):
    from safetensors import SafetensorError

    model_dir = saved_model(experts, tmp_path / "model")
    weights = model_dir / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped halfway
    assert_main_user_error(capsys, ["chat", "--model", str(model_dir), "hello"],
                           re.escape(f"seechat chat: error: {weights} is damaged or truncated (") + r".+"
                           + re.escape("); save the model again, or copy it again from where it came"),
                           SafetensorError)


def test_chat_names_a_missing_image_before_loading(capsys, plain_model, tmp_path):
    from seechat.errors import UserError

    missing = tmp_path / "cat.png"
    assert_main_user_error(capsys, ["chat", "--model", str(plain_model), "--image", str(missing), "hello"],
                           re.escape(f"seechat chat: error: --image {missing}: no such image file; "
                                     "give the path of an existing image"), UserError)
    assert_main_user_error(capsys, ["chat", "--model", str(plain_model), "a", "--question", "b"],
                           "seechat chat: error: give the question either positionally or with --question, not both",
                           UserError)


def test_eval_with_a_missing_data_file(capsys, plain_model, tmp_path):
    missing = tmp_path / "test.json"
    assert_main_user_error(capsys, ["eval", "--model", str(plain_model), "--data", str(missing)],
                           re.escape(f"seechat eval: error: data file {missing} does not exist"), FileNotFoundError)


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("model")

    help_text, arguments, _ = VERBS["merge"]
    monkeypatch.setitem(VERBS, "merge", (help_text, arguments, broken))
    with pytest.raises(KeyError):
        main(["merge", "--model", "m", "out"])


def test_a_data_loader_workers_user_error_is_told_as_itself():
    """torch re-raises a worker's SampleError (which its constructor cannot rebuild) as a
    RuntimeError holding the worker's traceback; the user is told the sample's problem."""
    from torch._utils import ExceptionWrapper

    from seechat.data import SampleError

    try:
        raise SampleError("q7", "image file not found", file="data/train.json")
    except SampleError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(RuntimeError) as caught:
        wrapped.reraise()
    assert cli.user_error_message(caught.value) == "sample 'q7' in data/train.json: image file not found"
    assert cli.user_error_message(RuntimeError("Caught KeyError in DataLoader worker process 0.\n"
                                               "Original Traceback (most recent call last):\nKeyError: 'x'")) is None


def test_cpu_accelerate_config_is_one_cpu_process():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "recipes" / "accelerate" / "cpu.yaml"))
    assert (str(config.distributed_type).split(".")[-1], config.use_cpu, config.num_processes,
            config.num_machines, config.mixed_precision) == ("NO", True, 1, 1, "no")


def test_chat_prints_no_library_warnings(plain_model, tmp_path):
    """What the libraries say that the user cannot act on stays out of a chat: transformers'
    `past_key_values` FutureWarning (generation), peft's `is_gradient_checkpointing` one (loading
    LoRA), bitsandbytes' missing CPU kernels."""
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 20, 20)).save(tmp_path / "red.png")
    proc = run("chat", "--model", str(plain_model), "--image", str(tmp_path / "red.png"), "--max-new-tokens", "3",
               "What color is the shape?")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "bitsandbytes" not in proc.stderr, proc.stderr
