"""Check `seechat estimate` against measured peak memory on the CPU, and record the big-model
estimates the README quotes.

    .venv/bin/python benchmarks/estimate.py

For each small configuration a fresh subprocess imports everything, records its RSS (the
baseline: interpreter, torch, transformers), builds the model from the recipe, trains 3 steps
exactly as seechat.training.loop does (autocast per train.mixed_precision, fused AdamW, zero_grad to
None) and reads the kernel's peak RSS (VmHWM); measured = peak - baseline. Peak RSS of one
configuration varies by ~10% between runs (glibc's heap), so each runs in 3 fresh subprocesses
and the median is compared with the estimate's total for the same recipe, batch and sequence:
the goal is within +-15%.
Then the estimates of recipes/qlora_24gb.yaml (Vicuna-7B QLoRA) and its 13B variant are
written, from the built-in config table (no download). Writes benchmarks/results/estimate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOWER = {"image_size": 224, "patch_size": 14, "hidden_size": 384, "intermediate_size": 1536,
         "num_hidden_layers": 6, "num_attention_heads": 6}
LM = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536,
      "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048,
      "tie_word_embeddings": False}
# name -> (overrides, batch, sequence length, supervised tokens per sample)
CASES = {
    "align_bf16": (["stage=align"], 8, 512, 64),
    "finetune_bf16": (["stage=finetune"], 4, 512, 128),
    "finetune_fp32": (["stage=finetune", "train.mixed_precision=no"], 4, 512, 128),
    "finetune_ckpt_bf16": (["stage=finetune", "llm.gradient_checkpointing=true"], 8, 512, 128),
    "lora_bf16": (["stage=finetune", "llm.mode=lora", "llm.lora={r: 16}"], 8, 512, 128),
}


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _recipe(work: Path, overrides: list[str]) -> dict:
    import yaml

    from seechat.config import load_recipe
    from seechat.experiments.tiny import train_tokenizer

    tok = work / "tokenizer"
    if not tok.is_dir():
        train_tokenizer(["a picture of a red circle"] * 10, vocab_size=300, template="chatml").save_pretrained(tok)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"encoder": {"backend": "hf", "pretrained": False, "arch": "clip", "config": TOWER},
                  "adapter": "mlp2x_gelu", "llm": {"tokenizer": str(tok), "config": LM}},
        "train": {"mixed_precision": "bf16", "batch_size": 1},
    }))
    return load_recipe(path, overrides)


def child(case: str) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from llava_reference import synthetic_batch

    from seechat.models.kinds import build_model
    from seechat.tools.estimate import estimate
    from seechat.models.loss import reuse_frozen_head_casts
    from seechat.models.kinds import stage_modes
    from seechat.training.optim import make_optimizer

    torch.set_num_threads(1)
    overrides, batch, seq, sup = CASES[case]
    recipe = _recipe(Path(tempfile.mkdtemp()), overrides)
    est = estimate(recipe, batch=batch, seq_len=seq, supervised=sup, device="cpu")
    baseline = _status("VmRSS:")
    model = build_model(recipe["model"], stage_modes(recipe["stage"], recipe["model"]))
    data = synthetic_batch(model, batch, seq - model.num_image_tokens, sup)
    optimizer = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-5)
    model.train()
    bf16 = recipe["train"]["mixed_precision"] == "bf16"
    with reuse_frozen_head_casts():  # as the training loop does
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**data).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    measured = _status("VmHWM:") - baseline
    modules = {k: {f: getattr(m, f) for f in ("weights", "gradients", "optimizer", "activations", "transient")}
               for k, m in est["modules"].items()}
    return {"case": case, "overrides": overrides, "batch": batch, "seq_len": seq, "supervised": sup,
            "measured_mb": measured / 2**20, "estimated_mb": est["total"] / 2**20,
            "error": est["total"] / measured - 1, "modules_mb": {k: {f: v / 2**20 for f, v in m.items()}
                                                                   for k, m in modules.items()},
            "baseline_rss_mb": baseline / 2**20}


def big_estimates() -> dict:
    from seechat.config import load_recipe
    from seechat.tools.estimate import estimate, format_estimate

    out = {}
    for name, overrides in {"vicuna7b_qlora_24gb": [],
                            "vicuna13b_qlora_24gb": ["llm.name_or_path=lmsys/vicuna-13b-v1.5"]}.items():
        result = estimate(load_recipe(REPO / "recipes" / "qlora_24gb.yaml", overrides), dtype="bf16")
        out[name] = {"total_gib": result["total"] / 2**30, "table": format_estimate(result),
                     "command": "seechat estimate --config recipes/qlora_24gb.yaml --dtype bf16"
                     + "".join(f" {o}" for o in overrides)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per configuration (median)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "estimate.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    sys.path.insert(0, str(HERE))
    from provenance import provenance, write_results

    started = {**provenance(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    rows = []
    for case in args.cases.split(","):
        runs = []
        for _ in range(args.repeats):  # peak RSS of one configuration varies by ~10% between runs
            out = subprocess.run([sys.executable, __file__, "--child", case], env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        measured = [r["measured_mb"] for r in runs]
        r = {**runs[0], "measured_mb": statistics.median(measured), "measured_mb_runs": measured}
        r["error"] = r["estimated_mb"] / r["measured_mb"] - 1
        rows.append(r)
        print(f"{case}: measured {r['measured_mb']:.0f} MB (median of {measured}), estimated "
              f"{r['estimated_mb']:.0f} MB ({r['error']:+.1%})", flush=True)
    result = {**started, "command": "python " + " ".join(sys.argv),
              "goal": "|estimate / median measured - 1| <= 0.15", "cases": rows,
              "max_abs_error": max(abs(r["error"]) for r in rows),
              "within_15pct": all(abs(r["error"]) <= 0.15 for r in rows), "big": big_estimates()}
    write_results(result, args.out, f"; max |error| {result['max_abs_error']:.1%}")


if __name__ == "__main__":
    main()
