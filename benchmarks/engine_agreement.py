"""A trained model's answers in the stock engines against `seechat eval`'s, on the first N test
questions (greedy): vLLM on the `--to llava-hf` export (its own venv: scripts/vllm_venv.sh) and
lmms-eval (its own venv: scripts/lmms_eval_venv.sh) asking `seechat serve`. llama.cpp's
agreement is tests/test_gguf.py's. An engine whose venv is missing is recorded as skipped.

    make demo
    OMP_NUM_THREADS=1 python benchmarks/engine_agreement.py --model runs/demo/finetune/final \
        --data data/generated/easyvqa/test.json -n 200

Writes benchmarks/results/engine_agreement.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import provenance  # noqa: E402


def seechat_predictions(model: Path, data: Path, n: int, work: Path) -> list[dict]:
    from seechat import load
    from seechat.inference.evaluate import evaluate_file

    rows = json.loads(data.read_text())[:n]
    questions = work / "questions.json"
    questions.write_text(json.dumps(rows))
    evaluate_file(load(model), str(questions), image_root=str(data.parent), max_new_tokens=4,
                  predictions_path=work / "predictions.jsonl")
    return [json.loads(x) for x in (work / "predictions.jsonl").read_text().splitlines()]


def vllm(model: Path, data: Path, predictions: list[dict], work: Path) -> dict:
    from seechat.tools.export import export_llava_hf
    from seechat.tools.vllm_engine import vllm_answers, vllm_python

    if vllm_python() is None:
        return {"skipped": "no vLLM venv (bash scripts/vllm_venv.sh)"}
    export = export_llava_hf(model, work / "llava")
    pairs = [(str(data.parent / p["images"][0]), p["question"]) for p in predictions]
    theirs = vllm_answers(export, pairs, max_new_tokens=4)
    same = sum(a == p["prediction"] for a, p in zip(theirs, predictions))
    return {"identical_answers": same, "n": len(predictions)}


def lmms(model: Path, data: Path, n: int, work: Path) -> dict:
    import test_lmms_eval as lm
    from test_serve import free_port, wait_healthy

    if not (lm.VENV / ".seechat-complete").is_file():
        return {"skipped": "no lmms-eval venv (bash scripts/lmms_eval_venv.sh)"}
    lm.N = n
    (work / "data" / "generated").mkdir(parents=True, exist_ok=True)
    (work / "data" / "generated" / "easyvqa").symlink_to(data.parent.resolve())
    summary, predictions = lm.seechat_eval(model, work)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "seechat.cli", "serve", "--model", str(model), "--model-name",
                               "tiny", "--port", str(port), "--max-new-tokens", "8"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=300, process=server)
        accuracy, samples = lm.lmms_eval(work, port)
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = {int(s["doc_id"]): s for s in samples}
    same = 0
    for i, row in enumerate(predictions):
        answer = served[i]["filtered_resps"]
        while isinstance(answer, list):
            answer = answer[0]
        same += (served[i]["input"], answer) == (row["question"], row["prediction"])
    return {"lmms_eval_accuracy": accuracy, "seechat_eval_accuracy": summary["accuracy"],
            "identical_answers": same, "n": len(predictions)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="an easy-VQA test file (images beside it)")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_agreement.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        predictions = seechat_predictions(args.model, args.data, args.n, work)
        results = {
            "commit": provenance.commit(), "machine": provenance.machine(),
            "command": "python benchmarks/engine_agreement.py " + " ".join(sys.argv[1:]),
            "model": str(args.model), "questions": args.n,
            "seechat_accuracy": sum(p["correct"] for p in predictions) / len(predictions),
            "vllm": vllm(args.model, args.data, predictions, work / "vllm"),
            "lmms_eval": lmms(args.model, args.data, args.n, work / "lmms"),
        }
    provenance.write_results(results, args.out)
    print(json.dumps({k: results[k] for k in ("seechat_accuracy", "vllm", "lmms_eval")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
