"""One short GPU check (<= 8 minutes on one H100): our stage 1 (plain and GradCache) and stage 2 against
sentence-transformers MultipleNegativesRankingLoss on the same batch, at paper lengths.

    python bench/gpu_check.py --out DIR --data SCIFACT_DIR --tokenizer QWEN3_TOKENIZER_DIR [--tiny]

- Backbone: a random-initialised Qwen3-0.6B shape built from a config (no download; throughput, memory and MFU do not
  depend on the weights), bf16, flash-attention 2 if it imports, else sdpa, gradient checkpointing.
- Data: SciFact train queries, their qrels positive and 3 other corpus documents as negatives (stage 1, q512/d512);
  16-candidate slates with the listwise prompt at the stage-2 recipe lengths (prompt 8192, 480 per candidate).
  Tokenized by our text contract (data_pipeline/text.py) with the real Qwen3 tokenizer.
- Ours: the trainer's components (load_backbone: packed varlen attention on CUDA, `--packing`; ZeRO-3 sized to the
  model, trainer/zero.py; fused AdamW; chunked encoding; GradCache without checkpointing), bf16, world of one;
  `--compile` / `--liger` switch on the fused-layer settings.
- sentence-transformers: the same model folder, last-token pooling + Normalize, MNRL on (query, positive, 3
  negatives) with tokenizer padding per column, fused torch AdamW, bf16 autocast (what its trainer does with bf16=True).
- Each configuration runs in its own process (clean peak memory); tokens/s counts real (non-pad) tokens; MFU is
  trainer/flops.py (6 x non-embedding parameters per real token plus causal attention) over the bf16 matmul peak
  measured in the same run. OUT/gpu-check.json is the bench/results/ record.
`--tiny` is the CPU dry run the test suite uses (tiny Qwen3, short lengths, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
H100_BF16_DENSE = 989e12  # NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak


def lengths(tiny: bool) -> dict:
    if tiny:
        return dict(query_max_len=64, doc_max_len=64, prompt_max_len=600, prompt_doc_max_len=32)
    return dict(query_max_len=512, doc_max_len=512, prompt_max_len=8192, prompt_doc_max_len=480)


def build_model(folder: Path, tokenizer: str, tiny: bool) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(**(TINY if tiny else QWEN3_06B))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModel.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)


def make_batches(args, n_batches: int) -> list[dict]:
    """Batches in the loader's layout (left-padded ids/masks, docs grouped per query)."""
    import numpy as np
    import torch

    from common.pretrained import load_tokenizer
    from data_pipeline.instructions import InstructionTable
    from data_pipeline.text import TextEncoder, TokenizationConfig
    from evaluation.readers import load_corpus, load_qrels, load_queries
    from modeling.embedding import left_pad

    d = Path(args.data)
    corpus, queries = load_corpus(d / "corpus.jsonl"), load_queries(d / "queries.jsonl")
    qrels = load_qrels(d / "qrels" / "train.tsv")
    ins = InstructionTable.load().lookup("scifact", allow_unknown=False)
    text = TextEncoder(
        load_tokenizer(args.tokenizer), TokenizationConfig(tokenizer=args.tokenizer, **lengths(args.tiny))
    )
    rng = random.Random(0)
    doc_ids = sorted(corpus)
    qids = sorted(q for q in qrels if q in queries)
    rng.shuffle(qids)
    out = []
    for i in range(n_batches):
        qs = qids[i * args.batch : (i + 1) * args.batch]
        if args.stage == 1:
            groups = [[next(iter(qrels[q]))] + rng.sample(doc_ids, 3) for q in qs]
        else:
            groups = [[next(iter(qrels[q]))] + rng.sample(doc_ids, 15) for q in qs]
        texts = [[corpus[x] for x in g] for g in groups]
        q_ids = text.encode_queries([queries[q] for q in qs], [ins.query[0]] * len(qs))
        d_ids = text.encode_documents([t for g in texts for t in g])
        b = {
            "docs_per_query": len(groups[0]),
            "raw": {"queries": [queries[q] for q in qs], "docs": texts, "instruction": ins.query[0]},
        }
        b["query_input_ids"], b["query_attention_mask"] = left_pad(q_ids, text.pad_id, 8)
        b["doc_input_ids"], b["doc_attention_mask"] = left_pad(d_ids, text.pad_id, 8)
        b["doc_hash"] = torch.arange(len(d_ids), dtype=torch.long)
        if args.stage == 2:
            prompts = [p for p, _ in text.encode_listwise([queries[q] for q in qs], texts, [ins.rerank] * len(qs))]
            b["prompt_input_ids"], b["prompt_attention_mask"] = left_pad(prompts, text.pad_id, 8)
            b["ranking"] = torch.stack([torch.randperm(16) for _ in qs])
            b["cand_mask"] = torch.ones(len(qs), 16, dtype=torch.bool)
        b["real_tokens"] = int(
            sum(int(b[f"{f}_attention_mask"].sum()) for f in ("query", "doc", "prompt") if f"{f}_input_ids" in b)
        )
        b["padded_tokens"] = int(
            sum(b[f"{f}_input_ids"].numel() for f in ("query", "doc", "prompt") if f"{f}_input_ids" in b)
        )
        out.append(b)
    del np
    return out


def matmul_peak(device) -> float:
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ a
    sync(device)
    t, k = time.perf_counter(), 10
    for _ in range(k):
        a @ a
    sync(device)
    return 2 * n**3 * k / (time.perf_counter() - t)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mem_gb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(args, batches, device) -> dict:
    """The trainer's components as `python -m trainer` assembles them: load_backbone (packed attention on CUDA),
    ZeRO sized to the model (trainer/zero.py), fused AdamW, chunked (packed) encoding, GradCache when asked."""
    import deepspeed
    import torch

    from modeling import distributed as D
    from modeling.chunking import ChunkStats
    from modeling.embedding import Encoder
    from trainer.config import ModelConfig, TrainConfig
    from trainer.flops import attention_shape, step_flops
    from trainer.grad_cache import CachedStep
    from trainer.memory import available_bytes
    from trainer.model import load_backbone
    from trainer.objective import compute
    from trainer.zero import ds_config, make_optimizer, plan

    D.init(300)
    cfg = TrainConfig(stage=args.stage)
    cfg.loader.batch_size = args.batch
    # GradCache holds one chunk's graph: no checkpointing on top (its recompute would be a third forward)
    cfg.model = ModelConfig(
        gradient_checkpointing=args.mode != "gradcache", packing=args.packing, compile=args.compile, liger=args.liger
    )
    cfg.optim.lr = 1e-5
    cfg.encode.chunk_tokens = args.chunk_tokens
    backbone, attn = load_backbone(args.model, cfg.model, torch.bfloat16, device.type == "cuda")
    n_all = sum(p.numel() for p in backbone.parameters())
    n_flop = n_all - backbone.get_input_embeddings().weight.numel()
    zp = plan(
        cfg,
        n_params=n_all,
        largest=max(p.numel() for p in backbone.parameters()),
        bytes_per=2,
        rank_bytes=available_bytes(device),
        cuda=device.type == "cuda",
    )
    print(f"[zero] {zp}", flush=True)
    enc = Encoder(backbone, "last")
    params = list(enc.parameters())
    engine, *_ = deepspeed.initialize(
        model=enc,
        model_parameters=params,
        optimizer=make_optimizer(cfg, params),
        config=ds_config(cfg, True, backbone.config.hidden_size, device.type == "cuda", zero=zp),
    )
    cache = CachedStep(engine, args.chunk_tokens) if args.mode == "gradcache" else None
    engine.train()
    times, stats_all = [], []
    for i, b in enumerate(batches):
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        sync(device)
        t = time.perf_counter()
        stats = ChunkStats()
        if cache:
            cache.forward(b, args.stage, cfg.loss, stats)
            cache.backward(lambda s, last: (engine.set_gradient_accumulation_boundary(last), engine.backward(s)))
        else:
            terms = compute(engine, b, args.stage, cfg.loss, args.chunk_tokens, stats)
            engine.set_gradient_accumulation_boundary(True)
            engine.backward(terms["loss"])
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            stats_all.append(stats)
    real = sum(s.real for s in stats_all)
    padded = sum(s.padded for s in stats_all)
    flops = step_flops(n_flop, real, sum(s.sum_sq for s in stats_all), *attention_shape(backbone.config), causal=True)
    return {
        "attention": attn,
        "n_flop_params": n_flop,
        "seconds": sum(times),
        "real_tokens": real,
        "flops": flops,
        "zero": zp.reason,
        "computed_tokens": padded,
        "forwards_per_step": stats_all[-1].forwards if stats_all else 0,
        "ds_skipped_steps": int(getattr(engine, "skipped_steps", -1)),
        "padding_efficiency": real / max(padded, 1),
        "loader_padding_efficiency": sum(b["real_tokens"] for b in batches[args.warmup :])
        / sum(b["padded_tokens"] for b in batches[args.warmup :]),
    }


def run_st(args, batches, device) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    from trainer.config import ModelConfig
    from trainer.flops import attention_shape, step_flops
    from trainer.model import attention_candidates

    attn = attention_candidates(ModelConfig(), device.type == "cuda")[0]
    tr = models.Transformer(
        str(args.model),
        max_seq_length=lengths(args.tiny)["doc_max_len"],
        model_kwargs={"attn_implementation": attn, "dtype": torch.float32},
    )
    pool = models.Pooling(
        tr.get_embedding_dimension() if hasattr(tr, "get_embedding_dimension") else tr.get_word_embedding_dimension(),
        "lasttoken",
    )
    model = SentenceTransformer(modules=[tr, pool, models.Normalize()], device=str(device))
    model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_flop = sum(p.numel() for p in model.parameters()) - model[0].auto_model.get_input_embeddings().weight.numel()
    if args.mode == "st-cmnrl":  # GradCache in sentence-transformers; mini-batch ~ our chunk (512-token texts)
        loss_fn = CachedMultipleNegativesRankingLoss(
            model, scale=1 / 0.03, mini_batch_size=max(args.chunk_tokens // 512, 1)
        )
    else:
        loss_fn = MultipleNegativesRankingLoss(model, scale=1 / 0.03)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # its trainer's default with torch >= 2.8
    model.train()
    times, real, sq = [], 0, 0
    for i, b in enumerate(batches):
        raw = b["raw"]
        cols = [[f"Instruct: {raw['instruction']}\nQuery:{q}" for q in raw["queries"]]]
        g = len(raw["docs"][0])
        cols += [[docs[j] for docs in raw["docs"]] for j in range(g)]
        prep = getattr(model, "preprocess", None) or model.tokenize  # ST 6 renamed tokenize -> preprocess
        feats = [{k: v.to(device) for k, v in prep(c).items() if torch.is_tensor(v)} for c in cols]
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(feats, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            real += sum(int(f["attention_mask"].sum()) for f in feats)
            sq += sum(int((f["attention_mask"].sum(1) ** 2).sum()) for f in feats)
    flops = step_flops(n_flop, real, sq, *attention_shape(model[0].auto_model.config), causal=True)
    return {"attention": attn, "n_flop_params": n_flop, "seconds": sum(times), "real_tokens": real, "flops": flops}


def child(args) -> int:
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    batches = make_batches(args, args.warmup + args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run_st(args, batches, device) if args.mode.startswith("st-") else run_ours(args, batches, device)
    peak = args.peak or matmul_peak(device)
    res.update(
        stage=args.stage,
        mode=args.mode,
        batch=args.batch,
        steps=args.steps,
        device=str(device),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        peak_flops=peak,
        tokens_per_s=res["real_tokens"] / res["seconds"],
        s_per_step=res["seconds"] / args.steps,
        mfu=res["flops"] / res["seconds"] / peak,
        mfu_vs_datasheet=res["flops"] / res["seconds"] / H100_BF16_DENSE,
        peak_mem_gb=peak_mem_gb(device),
        wall_s=time.perf_counter() - t0,
    )
    with open(args.result, "a") as f:
        f.write(json.dumps(res) + "\n")
    return 0


CONFIGS = [(1, "st-mnrl"), (1, "ours"), (1, "st-cmnrl"), (1, "gradcache"), (2, "ours")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="results.jsonl, summary.json and one log per configuration")
    ap.add_argument("--work", default="", help="scratch for the random-initialised model (default: OUT/model)")
    ap.add_argument(
        "--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")) + "/scifact"
    )
    ap.add_argument(
        "--tokenizer",
        default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")) + "/tokenizers/qwen3",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny Qwen3, short lengths")
    ap.add_argument("--batch1", type=int, default=32, help="stage-1 queries per step (x 4 documents)")
    ap.add_argument("--batch2", type=int, default=4, help="stage-2 slates per step (x 16 candidates + prompt)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk-tokens", type=int, default=16384)
    ap.add_argument("--packing", default="auto", choices=["auto", "on", "off"], help="model.packing for ours")
    ap.add_argument("--compile", action="store_true", help="model.compile for ours (decoder layers compiled)")
    ap.add_argument("--liger", action="store_true", help="model.liger for ours (liger-kernel, when carried)")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per configuration")
    # internal: one configuration in a child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.work) / "model" if args.work else out / "model"
    t = time.perf_counter()
    build_model(model, args.tokenizer, args.tiny)
    print(f"[gpu_check] model built in {time.perf_counter() - t:.0f}s", flush=True)
    result = out / "results.jsonl"
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for stage, mode in CONFIGS:
        batch = args.batch1 if stage == 1 else args.batch2
        cmd = (
            [
                sys.executable,
                __file__,
                "--child",
                "--out",
                str(out),
                "--data",
                args.data,
                "--tokenizer",
                args.tokenizer,
                "--stage",
                str(stage),
                "--mode",
                mode,
                "--batch",
                str(batch),
                "--model",
                str(model),
                "--result",
                str(result),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--chunk-tokens",
                str(args.chunk_tokens),
                "--packing",
                args.packing,
            ]
            + (["--tiny"] if args.tiny else [])
            + (["--compile"] if args.compile else [])
            + (["--liger"] if args.liger else [])
        )
        t = time.perf_counter()
        log = out / f"stage{stage}-{mode}.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(
                    cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        print(f"[gpu_check] stage {stage} {mode}: rc={rc} in {time.perf_counter() - t:.0f}s", flush=True)
        if rc != 0:
            print(log.read_text()[-3000:], flush=True)
    rows = [json.loads(x) for x in result.read_text().splitlines()] if result.exists() else []
    for r in rows:
        print(
            f"[gpu_check] {r['gpu']} stage {r['stage']} {r['mode']:9s} attn={r['attention']} batch={r['batch']}: "
            f"{r['tokens_per_s']:.0f} real tok/s, {r['s_per_step']:.3f} s/step, MFU {r['mfu']:.1%} of measured "
            f"bf16 peak ({r['peak_flops'] / 1e12:.0f} TFLOP/s), {r['mfu_vs_datasheet']:.1%} of 989 TFLOP/s, "
            f"peak mem {r['peak_mem_gb']:.1f} GB"
            + (
                f", padding eff {r['padding_efficiency']:.2f} (loader {r['loader_padding_efficiency']:.2f})"
                if "padding_efficiency" in r
                else ""
            )
        )
    by = {(r["stage"], r["mode"]): r for r in rows}
    if (1, "ours") in by and (1, "st-mnrl") in by:
        print(
            f"[gpu_check] stage 1 ours / sentence-transformers MNRL tokens/s = "
            f"{by[1, 'ours']['tokens_per_s'] / by[1, 'st-mnrl']['tokens_per_s']:.2f}x",
            flush=True,
        )
    if (1, "gradcache") in by and (1, "st-cmnrl") in by:
        print(
            f"[gpu_check] stage 1 GradCache ours / sentence-transformers CachedMNRL tokens/s = "
            f"{by[1, 'gradcache']['tokens_per_s'] / by[1, 'st-cmnrl']['tokens_per_s']:.2f}x",
            flush=True,
        )
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "gpu-check.json").write_text(json.dumps(results_record(by), indent=1))  # bench/results/ format
    return 0 if len(rows) == len(CONFIGS) else 1


def results_record(by: dict) -> dict:
    """The figures a later reader checks without re-running (copied to bench/results/gpu-check.json)."""
    first = next(iter(by.values()), {})
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()

    def ratio(a, b):
        return by[a]["tokens_per_s"] / by[b]["tokens_per_s"] if a in by and b in by else None

    return {
        "device": first.get("gpu", ""),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "mfu": {
            "stage1": by.get((1, "ours"), {}).get("mfu"),
            "grad_cache": by.get((1, "gradcache"), {}).get("mfu"),
            "stage2": by.get((2, "ours"), {}).get("mfu"),
        },
        "ratios": {
            "stage1_vs_mnrl": ratio((1, "ours"), (1, "st-mnrl")),
            "gradcache_vs_cachedmnrl": ratio((1, "gradcache"), (1, "st-cmnrl")),
        },
        "rows": list(by.values()),
    }


if __name__ == "__main__":
    raise SystemExit(main())
