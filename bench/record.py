"""Benchmark figures a later reader can check without re-running: machine, date, commit, merged into one JSON per
benchmark family under bench/results/ (written to a temporary name, then renamed)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """What a figure was measured on: the CPU model, the flags that decide bf16, cores, torch."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in info, "amx_bf16": "amx_bf16" in info,
            "avx512f": "avx512f" in info, "avx2": "avx2" in info, "torch": torch.__version__}


def commit() -> str:
    """HEAD, marked when tracked files differ from it (the figures then belong to uncommitted changes)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        # the records themselves do not count: a benchmark that merges figures twice would mark its own second run
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()
    return head + ("+changes" if dirty else "")


def merge(path: Path, ratios: dict[str, float], run_key: str, run: dict) -> None:
    """Ratios merge by key; each invocation's full figures are kept under `runs[run_key]`."""
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {
        **old,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "ratios": {**old.get("ratios", {}), **ratios},
        "runs": {**old.get("runs", {}), run_key: run},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.rename(path)
    print(f"merged into {path}")
