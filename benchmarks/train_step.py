"""Training-step throughput: seechat vs transformers' LlavaForConditionalGeneration, same weights,
same batches, forward + backward + AdamW step under bf16 autocast on the CPU.

    .venv/bin/python benchmarks/train_step.py                 both configurations, 3 rounds
    .venv/bin/python benchmarks/train_step.py --rounds 1 --steps 2 --configs llava576

Configurations (finetune stage: encoder frozen, adapter + LLM trained in full):
  llava576   CLIP-like tower (336 px / 14 -> 576 patches), mlp2x_gelu, Qwen2.5-vocabulary LM
             (151,936 ids, hidden 512); 576 image tokens + 256 text tokens = 832 per row.
             Reference: stock Llava with the same weights.
  resampler256  same tower and LM, Qwen-VL resampler (256 queries); 256 + 512 text = 768.
             Llava cannot hold a resampler, so the reference is the same seechat model trained
             the way a stock loop trains it: full [B, T, V] logits through the LM's own loss.
             The LM side - where seechat's optimisations act - is then identical in both.

Every run of a system is a fresh subprocess (clean peak RSS, measured as VmHWM after a reset
once the model is built); rounds alternate seechat / reference so that machine noise hits both.
Reported per system: median samples/s over rounds (each round: median of its timed steps), the
loss of the first step (same weights, same batch: must agree), peak RSS, executed FLOPs per step
(torch FlopCounterMode on the warm-up step) and MFU = FLOPs/s / bf16 matmul peak measured in the
same subprocess. Writes benchmarks/results/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CONFIGS = {
    "llava576": {"adapter": {"type": "mlp", "projector": "mlp2x_gelu"}, "text": 256, "supervised": 128,
                 "reference": "llava"},
    "resampler256": {"adapter": {"type": "resampler", "grid_size": 16}, "text": 512, "supervised": 256,
                     "reference": "seechat_plain"},
}
MODES = {"encoder": "frozen", "adapter": "full", "llm": "full"}


def _rss_reset() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so the peak covers training only."""
    Path("/proc/self/clear_refs").write_text("5")


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(system: str, config: str, batch_size: int, steps: int, threads: int) -> dict:
    import gc

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(HERE))
    from llava_reference import bf16_peak_gflops, llava_from, seechat_model, synthetic_batch

    from seechat.training.optim import make_optimizer

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    model = seechat_model(cfg["adapter"], MODES)
    batch = synthetic_batch(model, batch_size, cfg["text"], cfg["supervised"])
    if system == "llava":
        net = llava_from(model)
        net.model.vision_tower.requires_grad_(False)
        del model
        gc.collect()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)  # a standard loop: AdamW's defaults

        def loss_fn():
            return net(**inputs).loss
    elif system == "seechat_plain":
        net = model
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def loss_fn():
            embeds = net.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"])
            return net.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
    else:
        net = model
        optimizer = make_optimizer([{"params": [p for p in net.parameters() if p.requires_grad]}], lr=1e-5)

        def loss_fn():
            return net(**batch).loss
    net.train()
    peak = bf16_peak_gflops()
    gc.collect()
    _rss_reset()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    with FlopCounterMode(display=False) as counter:
        first_loss = step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {
        "system": system, "config": config, "batch_size": batch_size, "first_loss": first_loss,
        "step_seconds": times, "samples_per_s": batch_size / step_s, "flops_per_step": flops,
        "peak_gflops": peak, "mfu": flops / step_s / (peak * 1e9), "peak_rss_mb": _rss_peak_mb(),
        "seq_len": int(batch["input_ids"].shape[1]),
        "trained_params": sum(p.numel() for p in params) if system != "seechat" else
        sum(p.numel() for p in net.parameters() if p.requires_grad),
    }


def run_child(system: str, config: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, __file__, "--child", system, "--configs", config, "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{system}/{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], peak_gflops: float) -> dict:
    """Medians over rounds. MFU uses `peak_gflops`, the best matmul rate any subprocess of this
    run measured: a subprocess that met a busy machine would otherwise flatter its own MFU."""
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    for r in runs:
        r["mfu"] = r["flops_per_step"] / statistics.median(r["step_seconds"]) / (peak_gflops * 1e9)
    return {
        "samples_per_s": med("samples_per_s"), "mfu": med("mfu"), "peak_rss_mb": med("peak_rss_mb"),
        "flops_per_step": runs[0]["flops_per_step"], "peak_gflops": peak_gflops,
        "first_loss": runs[0]["first_loss"], "trained_params": runs[0]["trained_params"],
        "seq_len": runs[0]["seq_len"], "rounds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per subprocess (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "train_step.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.configs, args.batch_size, args.steps, args.threads)))
        return
    sys.path.insert(0, str(HERE))
    from provenance import provenance, write_results

    results: dict = {**provenance(), "command": "python " + " ".join(sys.argv),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "threads": args.threads, "load_average_start": os.getloadavg(), "configs": {}}
    for config in args.configs.split(","):
        systems = ("seechat", CONFIGS[config]["reference"])
        runs: dict[str, list] = {s: [] for s in systems}
        for r in range(args.rounds):
            for system in systems if r % 2 == 0 else systems[::-1]:
                runs[system].append(run_child(system, config, args))
                last = runs[system][-1]
                print(f"{config} round {r} {system}: {last['samples_per_s']:.3f} samples/s, "
                      f"loss {last['first_loss']:.5f}, rss {last['peak_rss_mb']:.0f} MB, mfu {last['mfu']:.1%}",
                      flush=True)
        peak = max(r["peak_gflops"] for rs in runs.values() for r in rs)
        ours, ref = summarise(runs["seechat"], peak), summarise(runs[systems[1]], peak)
        ratio_per_round = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs["seechat"], runs[systems[1]])]
        results["configs"][config] = {
            "reference": systems[1], "seechat": ours, "reference_result": ref,
            "speedup": ours["samples_per_s"] / ref["samples_per_s"],
            "speedup_per_round": ratio_per_round,
            "loss_rel_diff": abs(ours["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"]),
            "rss_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"],
        }
        print(json.dumps({k: v for k, v in results["configs"][config].items()
                          if k not in ("seechat", "reference_result")}), flush=True)
    results["load_average_end"] = os.getloadavg()
    write_results(results, args.out)


if __name__ == "__main__":
    main()
