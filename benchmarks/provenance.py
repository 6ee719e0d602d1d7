"""Shared by the benchmarks: what a figure belongs to - the commit (with "-dirty" when the code differs from
it, so the figure belongs to no commit) and the machine (bf16 kernels differ between CPUs:
AVX512-BF16, AMX, emulated)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def commit() -> str:
    """The short commit hash, with "-dirty" when tracked files other than benchmark results
    differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results")
        return git("rev-parse", "--short=7", "HEAD") + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    from seechat.precision import host

    return host()


def provenance() -> dict:
    """Commit and machine; call it at the start of a run (the code a run imports is the code at its start)."""
    return {"commit": commit(), "machine": machine()}


def write_results(results: dict, out: str | os.PathLike, summary: str = "") -> None:
    """Write a benchmark's results to `out` as JSON (creating its directory) and say so."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(f"wrote {out}{summary}")
