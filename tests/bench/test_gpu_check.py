"""The GPU check's CPU dry run (tiny Qwen3, short lengths): every configuration runs and reports its figures, so the
one command prepared for a GPU machine is known to work before the GPU is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_netns

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_on_cpu(tmp_path):
    require_netns()
    data = os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    if not os.path.isdir(f"{data}/scifact") or not os.path.isdir(f"{data}/tokenizers/qwen3"):
        pytest.skip(f"needs SciFact and the Qwen3 tokenizer under {data} (E2RANK_SHARED_DATA)")
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(tmp_path), "--batch1", "2",
                        "--batch2", "1", "--steps", "1", "--warmup", "1", "--chunk-tokens", "256", "--timeout", "200",
                        "--packing", "on"],  # the packed path the GPU takes by default (its CPU kernel here)
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(x["stage"], x["mode"]) for x in rows} == {(1, "st-mnrl"), (1, "ours"), (1, "st-cmnrl"), (1, "gradcache"),
                                                        (2, "ours")}
    for x in rows:
        assert x["tokens_per_s"] > 0 and x["peak_mem_gb"] > 0 and 0 < x["mfu"]
        if x["mode"] in ("ours", "gradcache"):
            assert x["attention"].startswith("e2rank_varlen (sdpa per sequence")  # the kernel that ran, said
            assert x["padding_efficiency"] == 1.0  # packed rows carry no padding
            assert x["ds_skipped_steps"] == 0  # no non-finite gradients
            assert 0.5 < x["padding_efficiency"] <= 1.0
    assert "ours / sentence-transformers MNRL tokens/s" in r.stdout
    rec = json.loads((tmp_path / "gpu-check.json").read_text())  # what bench/results/gpu-check.json keeps
    assert rec["device"] == "cpu" and rec["commit"] and rec["date"]
    assert all(0 < rec["mfu"][k] for k in ("stage1", "grad_cache", "stage2"))
    assert all(rec["ratios"][k] > 0 for k in ("stage1_vs_mnrl", "gradcache_vs_cachedmnrl"))
