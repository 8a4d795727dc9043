"""Where a training step's time goes on a GPU, in ~1 minute: plain torch (no DeepSpeed), a random Qwen3-0.6B shape,
128 documents x 512 tokens + 32 queries, forward + backward, with and without gradient checkpointing and a padding
mask, and the top CUDA kernels of one step (torch.profiler).

    python bench/gpu_profile.py --out DIR [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step(model, ids, mask, how: str) -> None:
    """Forward + backward of a toy objective: ours (right-padded, no mask) or HF's default (padding mask)."""
    from modeling.embedding import embed

    if how == "ours_nomask":
        e = embed(model, ids, mask, "last", causal=True)
    else:
        e = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float()
    e.square().sum().backward()


def main() -> int:
    import torch
    from transformers import AutoModel, Qwen3Config

    from bench.gpu_check import QWEN3_06B, TINY
    from modeling.embedding import embed

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = Qwen3Config(**(TINY if args.tiny else QWEN3_06B))
    n, L = (8, 64) if args.tiny else (48, 512)
    rows = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for attn in ("sdpa",):
        with torch.device(dev):
            model = AutoModel.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
        model.train()
        ids = torch.randint(100, 150000 if not args.tiny else 1000, (n, L), device=dev)
        mask = torch.ones_like(ids)
        mask[: n // 2, : L // 3] = 0  # half the batch left-padded by a third
        flop_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        info = {"param_dtype": str(next(model.parameters()).dtype), "attn": model.config._attn_implementation}
        for ckpt in (False, True):
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for how in ("ours_nomask", "padding_mask"):
                for _ in range(2):
                    step(model, ids, mask, how)
                sync()
                t = time.perf_counter()
                k = 3
                for _ in range(k):
                    step(model, ids, mask, how)
                sync()
                dt = (time.perf_counter() - t) / k
                real = int(mask.sum())
                rows.append({**info, "ckpt": ckpt, "how": how, "s_per_step": dt, "tokens": n * L,
                             "tflops_6N_real": 6 * flop_params * real / dt / 1e12})
                print(json.dumps(rows[-1]), flush=True)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            e = embed(model, ids, mask, "last", causal=True)
            e.square().sum().backward()
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25)
        (out / "profile.txt").write_text(table)
        print(table[:6000], flush=True)
    a = torch.randn(8192 if dev.type == "cuda" else 1024, 8192 if dev.type == "cuda" else 1024, dtype=torch.bfloat16,
                    device=dev)
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    rows.append({"matmul_bf16_tflops": 2 * a.shape[0] ** 3 * 10 / (time.perf_counter() - t) / 1e12,
                 "tf32_allowed": torch.backends.cuda.matmul.allow_tf32, "torch": torch.__version__})
    print(json.dumps(rows[-1]), flush=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
