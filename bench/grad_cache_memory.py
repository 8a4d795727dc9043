"""GradCache's memory claim: a global batch of 256 queries x (1 positive + 8 negatives) on 2 CPU ranks, against the
peak RSS of a plain 16-query micro-batch (8 per rank), same model and lengths, in the same run.

    python bench/grad_cache_memory.py [--model pypi:all-minilm-l6-v2] [--len 64]

Both are real `torchrun -m trainer` jobs (DeepSpeed ZeRO-3, 2 gloo ranks, fp32, 1 optimizer step); the GradCache
chunk holds as many tokens as the plain micro-batch (8 x 9 texts x len), so its activations are one micro-batch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pypi:all-minilm-l6-v2")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    from data_pipeline.beir import bm25_contrastive
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run
    from data_pipeline.text import TokenizationConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gc-"))
    work.mkdir(parents=True, exist_ok=True)
    recs = work / "scifact-train-8neg.jsonl"
    if not recs.exists():
        bm25_contrastive(Path(args.data) / "scifact", "train", recs, negatives=8, source="scifact")
    shards = work / f"shards-{args.len}"
    run(PipelineConfig(kind="contrastive", inputs=[str(recs)], output=str(shards), samples_per_shard=200,
                       tokenization=TokenizationConfig(tokenizer=args.model, query_max_len=args.len,
                                                       doc_max_len=args.len), progress=False))
    chunk = 8 * 9 * args.len
    rows = {}
    for name, batch, cache in (("plain, 16 queries", 8, False), ("GradCache, 256 queries", 128, True)):
        out = work / f"run-{batch}-{cache}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
               "stage=1", f"shards={shards}", f"model.path={args.model}", f"model.pooling={args.pooling}",
               f"run.output_dir={out}", "run.max_steps=1", "run.export=false", f"loader.batch_size={batch}",
               "loader.negatives_per_query=8", "model.dtype=fp32", f"encode.grad_cache={str(cache).lower()}",
               f"encode.chunk_tokens={chunk}"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode:
            print(f"{name}: FAILED\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            return 1
        m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        rows[name] = {k: m[k] for k in ("peak_mem_gb", "step_time_s", "tokens_per_s", "forwards", "loss")}
        print(f"{name}: " + json.dumps(rows[name]), flush=True)
    a, b = rows["plain, 16 queries"], rows["GradCache, 256 queries"]
    print(f"peak RSS per rank: GradCache 256 queries / plain 16 queries = {b['peak_mem_gb'] / a['peak_mem_gb']:.2f}x "
          f"({b['peak_mem_gb']:.2f} vs {a['peak_mem_gb']:.2f} GB), 16x the queries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
