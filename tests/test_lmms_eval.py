"""lmms-eval (0.7.x, its `openai` model) scoring a model through `seechat serve`, on the local
`seechat_easyvqa` task (seechat/resources/lmms_eval/): the same accuracy as `seechat eval`, and
the same answer to every question.

lmms-eval lives in its own venv (scripts/lmms_eval_venv.sh builds it once under the user cache
dir; .ci/run does); without it this test is skipped and says how to build it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seechat.config import REPO_ROOT
from test_serve import free_port, wait_healthy

pytestmark = pytest.mark.slow

N = 50
TASK_DIR = REPO_ROOT / "seechat" / "resources" / "lmms_eval"
VENV = Path(os.environ.get("SEECHAT_LMMS_EVAL_VENV")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seechat" / "lmms-eval-0.7.3")
LMMS_PYTHON = VENV / "bin" / "python"
needs_lmms_eval = pytest.mark.skipif(
    not (VENV / ".seechat-complete").is_file(),
    reason=f"lmms-eval's venv is not built at {VENV}: run `bash scripts/lmms_eval_venv.sh` (.ci/run does)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory laid out like a checkout after `make demo`: data/generated/easyvqa prepared
    from the easy-vqa package (the task's paths are relative to where lmms-eval runs)."""
    from seechat.experiments.easyvqa.prepare import prepare

    root = tmp_path_factory.mktemp("lmms")
    prepare(root / "data" / "generated" / "easyvqa")
    return root


@pytest.fixture(scope="module")
def trained(experts, workdir) -> Path:
    """A tiny stitched model trained for a few seconds on easy-VQA: it answers in the answer
    vocabulary, right on some questions and wrong on others (a score strictly between 0 and 1)."""
    from conftest import model_config
    from seechat.config import load_recipe
    from seechat.training.loop import run

    data = workdir / "data" / "generated" / "easyvqa"
    recipe = workdir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "finetune", "output_dir": str(workdir / "run"),
        "model": model_config(experts, "hf", "mlp", "qwen2"),
        "data": {"train": str(data / "train_balanced.json"), "image_root": str(data), "num_workers": 0,
                 "max_samples": 1600},
        "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 100, "log_every": 50, "trackers": [],
                  "mixed_precision": "no", "warmup_ratio": 0.0},
    }))
    summary = run(load_recipe(recipe))
    return Path(summary["final"])


def seechat_eval(model: Path, workdir: Path) -> tuple[dict, list[dict]]:
    """`seechat eval` on the first N test questions: its summary and predictions."""
    data = workdir / "data" / "generated" / "easyvqa"
    out = workdir / "seechat-eval"
    subprocess.run([sys.executable, "-m", "seechat.cli", "eval", "--model", str(model), "--data",
                    str(data / "test.json"), "--image-root", str(data), "--max-samples", str(N),
                    "--output-dir", str(out)], check=True, capture_output=True, text=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((out / "summary.json").read_text())
    return summary, [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def lmms_eval(workdir: Path, port: int) -> tuple[float, list[dict]]:
    """lmms-eval's exact match on the first N questions, asking `seechat serve` at `port`; and
    its logged samples."""
    out = workdir / "lmms-out"
    command = [str(LMMS_PYTHON), "-m", "lmms_eval", "--model", "openai",
               "--model_args", f"model=tiny,base_url=http://127.0.0.1:{port}/v1,api_key=unused,num_concurrent=4",
               "--tasks", "seechat_easyvqa", "--include_path", str(TASK_DIR), "--limit", str(N),
               "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    env = {"PATH": os.environ["PATH"], "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(workdir / "hf-home"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_PROXY": "127.0.0.1,localhost"}
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    assert len(results) == 1, done.stderr[-5000:]  # (lmms-eval exits with 0 after an error)
    metrics = results[0]["results"]["seechat_easyvqa"]
    samples = [json.loads(x) for p in out.rglob("*samples_seechat_easyvqa*.jsonl") for x in p.read_text().splitlines()]
    return metrics["exact_match,none"], samples


@needs_lmms_eval
def test_lmms_eval_through_seechat_serve_scores_like_seechat_eval(trained, workdir):
    summary, predictions = seechat_eval(trained, workdir)
    assert summary["n"] == N and 0 < summary["accuracy"] < 1, summary  # a score that can disagree

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "seechat.cli", "serve", "--model", str(trained),
                               "--model-name", "tiny", "--port", str(port), "--max-new-tokens", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=120, process=server)
        accuracy, samples = lmms_eval(workdir, port)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert accuracy == pytest.approx(summary["accuracy"], abs=1e-12), (accuracy, summary)
    # question by question: lmms-eval saw the same answers seechat eval wrote
    assert len(samples) == N
    served = {int(s["doc_id"]): s for s in samples}
    for i, row in enumerate(predictions):
        sample, answer = served[i], served[i]["filtered_resps"]
        while isinstance(answer, list):
            answer = answer[0]
        assert (sample["input"], answer) == (row["question"], row["prediction"]), (i, sample, row)
        assert float(sample["exact_match"]) == float(row["correct"])
