"""Causal attention forward + backward on this CPU, bf16 inputs: torch's sdpa in bf16 (its CPU flash kernel) against
the same call on inputs cast to fp32 (what modeling/cpu_attention.py does in training up to
`model.fp32_attention_max_len` tokens), for SmolLM2-135M's attention shape (9 query / 3 KV heads of 64) at a few
(sequences x length) of about 2,000 tokens. Prints the fp32 / bf16 time ratio per shape (below 1: casting pays) and
the gradients' error against fp64.

    python bench/attention_cpu.py [--threads 1 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402

SHAPES = [(32, 64), (16, 128), (8, 192), (8, 256), (6, 384), (4, 512)]
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def attend(q, k, v, upcast: bool):
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timed(batch: int, length: int, dtype: torch.dtype, upcast: bool, repeats: int):
    """Median forward and backward milliseconds, and the gradients of the last repeat."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(batch, HEADS, length, HEAD_DIM, generator=g).to(dtype)
    fwd, bwd = [], []
    for i in range(repeats + 2):  # two warm-ups
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        out = attend(q, k, v, upcast).to(dtype)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        if i >= 2:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    return sorted(fwd)[len(fwd) // 2], sorted(bwd)[len(bwd) // 2], (q.grad, k.grad, v.grad)


def grad_error(grads, ref) -> float:
    return max(((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip(grads, ref))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(record.RESULTS / "attention-cpu.json"), help="'' = do not write")
    args = ap.parse_args()
    rows, ratios = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch, length in SHAPES:
            f16, b16, g16 = timed(batch, length, torch.bfloat16, False, args.repeats)
            f32, b32, g32 = timed(batch, length, torch.bfloat16, True, args.repeats)
            _, _, ref = timed(batch, length, torch.float64, False, 1)
            r = (f32 + b32) / (f16 + b16)
            ratios[f"fp32_vs_bf16_{length}_t{threads}"] = r
            rows.append({"threads": threads, "batch": batch, "length": length, "bf16_fwd_ms": f16, "bf16_bwd_ms": b16,
                         "fp32_fwd_ms": f32, "fp32_bwd_ms": b32, "fp32_over_bf16": r,
                         "bf16_grad_err": grad_error(g16, ref), "fp32_grad_err": grad_error(g32, ref)})
            x = rows[-1]
            print(f"threads {threads} {batch:3d} x {length:4d}: bf16 fwd {f16:6.2f} bwd {b16:6.2f} ms | cast to fp32 "
                  f"fwd {f32:6.2f} bwd {b32:6.2f} ms | fp32/bf16 {r:.2f}x | grad err vs fp64 "
                  f"{x['bf16_grad_err']:.1e} / {x['fp32_grad_err']:.1e}")
    if args.results:
        record.merge(Path(args.results), ratios, "shapes", {"rows": rows, "repeats": args.repeats})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
