"""Batched greedy generation with the KV cache: seechat's `generate` vs `transformers`'
`LlavaForConditionalGeneration.generate` on the same weights (the exported Llava model).

    .venv/bin/python benchmarks/generate.py [--rounds 3 --batch 4 --new-tokens 32]

Same left-padded prompts (8 text ids, 576 image placeholders, 24 text ids) and pixels for both;
exactly `--new-tokens` greedy tokens each (no early stop), bf16 autocast, one thread. Rounds
alternate the two systems; reported: median tokens/s (new tokens / wall time, prefill
included), the ratio, and whether both produced the same tokens. Writes
benchmarks/results/generate.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llava_reference import llava_from, seechat_model, synthetic_batch  # noqa: E402
from provenance import provenance, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "generate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = seechat_model({"type": "mlp", "projector": "mlp2x_gelu"},
                          {"encoder": "frozen", "adapter": "frozen", "llm": "frozen"}).eval()
    llava = llava_from(model).eval()
    batch = synthetic_batch(model, args.batch, 32, 0)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    mask = torch.ones_like(ids)
    never = model.base_llm.get_output_embeddings().weight.shape[0]  # an id no step can produce
    n = args.new_tokens

    def ours() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.generate(ids, attention_mask=mask, pixel_values=pixels, num_images=batch["num_images"],
                                  max_new_tokens=n, eos_token_id=never)

    def reference() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        return out[:, ids.shape[1]:]

    results: dict = {**provenance(), "command": "python " + " ".join(sys.argv), "threads": args.threads,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "load_average_start": os.getloadavg(), "batch": args.batch, "new_tokens": n,
                     "prompt_tokens": int(ids.shape[1]), "rounds": []}
    outputs = {}
    n_timed, n = n, 2
    ours(), reference()  # warm-up: first-call allocations and kernel setup hit neither timed round
    n = n_timed
    for r in range(args.rounds):
        row = {}
        for name, fn in (("seechat", ours), ("llava", reference))[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            outputs[name] = fn()
            row[name] = args.batch * n / (time.perf_counter() - t)
        row["ratio"] = row["seechat"] / row["llava"]
        results["rounds"].append(row)
        print(f"round {r}: seechat {row['seechat']:.2f} tok/s, llava {row['llava']:.2f} tok/s, x{row['ratio']:.2f}",
              flush=True)
    results.update({
        "seechat_tokens_per_s": statistics.median(r["seechat"] for r in results["rounds"]),
        "llava_tokens_per_s": statistics.median(r["llava"] for r in results["rounds"]),
        "ratio_median": statistics.median(r["ratio"] for r in results["rounds"]),
        "same_tokens": bool(torch.equal(outputs["seechat"], outputs["llava"])),
        "token_agreement": float((outputs["seechat"] == outputs["llava"]).float().mean()),
        "load_average_end": os.getloadavg(),
    })
    write_results(results, args.out, f": x{results['ratio_median']:.2f}, same tokens {results['same_tokens']}")


if __name__ == "__main__":
    main()
