"""Which mixed precision a run uses when the recipe says `mixed_precision: auto`.

bf16 autocast is a large win only where the hardware has bf16 matrix units: CUDA GPUs that
support it, and x86 CPUs with AVX512-BF16 or AMX. On an AVX2-only CPU PyTorch emulates bf16
matmuls, and they run ~60x slower than fp32 (measured on a 2-core AMD EPYC without AVX512:
1.2 vs 83 GFLOPS), so `auto` picks fp32 there. The choice reads CPU flags, not a timing, so the
same machine always makes the same choice (and so trains the same numbers).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHOICES = ("auto", "no", "bf16", "fp16")


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16, AMX-BF16) or is Apple
    silicon / an Arm CPU with BF16 (`bf16` in /proc/cpuinfo features)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        words = set(cpuinfo.read_text(errors="replace").split())
        return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def host() -> dict:
    """What a measured figure belongs to: the CPU (bf16 kernels differ between AVX512-BF16, AMX
    and emulation), its cores, torch's threads and version, and what `auto` precision picks here."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    words = set(text.split())
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu,
            "bf16_matrix_units": cpu_has_fast_bf16(), "amx": "amx_bf16" in words, "torch": torch.__version__,
            "mixed_precision_auto": resolve_mixed_precision("auto")}


def resolve_mixed_precision(value: str | None, device: str | None = None) -> str:
    """`auto` -> "bf16" where bf16 is fast on `device` (default: CUDA if present, else CPU),
    else "no"; any other value is returned as given (None -> "no")."""
    if value in (None, False, "no", "fp32"):
        return "no"
    if value not in CHOICES:
        raise ValueError(f"train.mixed_precision={value!r}; valid: {', '.join(CHOICES)}")
    if value != "auto":
        return value
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_fast_bf16()
    choice = "bf16" if fast else "no"
    logger.info("mixed_precision auto -> %s (%s: %s bf16 matrix units)", choice, device,
                "has" if fast else "no")
    return choice


def autocast_dtype(value: str | None) -> torch.dtype | None:
    """The autocast dtype for a (possibly `auto`) mixed-precision setting; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(value))


def cpu_autocast(dtype: torch.dtype | None):
    """`torch.autocast` on the CPU for `dtype`, or a no-op context for fp32 (None)."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def reuse_autocast_casts(module: torch.nn.Module):
    """Let autocast cast each frozen fp32 weight of `module` once, not once per call.

    Autocast keeps the low-precision copy of a weight for the rest of the enclosing autocast
    region only when the weight is a leaf that requires grad; frozen weights are re-cast on
    every call. In decoding that is most of a step's time: at batch 4 with a 151,936-row LM
    head, 32 greedy tokens took 5.5 s with per-call casts and 2.9 s with cached ones (1 thread,
    benchmarks/generate.py geometry). This marks the frozen floating-point weights as requiring
    grad for the duration of the block (the caller must be under `torch.no_grad`, so no graph
    is recorded) and restores the flags afterwards. The cached copies live until the outermost
    autocast region exits: the price is one low-precision copy of the weights."""
    if torch.is_grad_enabled():
        raise RuntimeError("reuse_autocast_casts needs torch.no_grad(): it flips requires_grad flags")
    flipped = [p for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in flipped:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in flipped:
            p.requires_grad_(False)
