"""Our stage 1 against sentence-transformers on the same model, data, lengths and global batch, in the same run.

    python bench/peer_throughput.py [--batch 4] [--steps 4] [--configs ours-fp32 st-fp32 ours-bf16 st-bf16 ...]

- Model: SmolLM2-135M (pypi:smollm2-135m), last-token pooling, L2-normalised, tau 0.03 (scale 33.3).
- Data: SciFact train, qrels positive + 3 BM25 hard negatives per query, queries with the E2Rank instruction,
  q512/d512 (our pipeline's shards; sentence-transformers gets the same texts and max_seq_length 512).
- 2 processes each (gloo): ours = `torchrun -m trainer` (DeepSpeed ZeRO-3, chunked padding-free encoding, optionally
  GradCache); sentence-transformers = DDP + MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss with
  gather_across_devices=True, AdamW, bf16 = autocast (what its trainer does with bf16=True), pre-tokenized batches.
- tokens/s counts real (non-pad) tokens of both processes; the first step is excluded; peak RSS is per process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import record  # noqa: E402

LEN = 512  # --len overrides (q and d)
PROFILE_STEP = 2  # 0-based: the third step (after the excluded first and one timed step)


def st_worker(args) -> NoReturn:
    """One rank of the sentence-transformers run (under torchrun)."""
    import torch
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from torch.nn.parallel import DistributedDataParallel
    from torch.profiler import ProfilerActivity, profile

    from common.pretrained import resolve
    from data_pipeline.instructions import InstructionTable
    from modeling.profiling import phase, phase_seconds, top_operators

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    folder = str(resolve(args.model, weights=True))
    tr = models.Transformer(folder, max_seq_length=LEN, model_kwargs={"attn_implementation": "sdpa",
                                                                       "dtype": torch.float32})
    dim = tr.get_embedding_dimension() if hasattr(tr, "get_embedding_dimension") else tr.get_word_embedding_dimension()
    model = SentenceTransformer(modules=[tr, models.Pooling(dim, "lasttoken"), models.Normalize()], device="cpu")
    if args.grad_ckpt:
        model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = DistributedDataParallel(model)
    if args.cached:
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=1 / 0.03, mini_batch_size=args.mini_batch,
                                                     gather_across_devices=True)
    else:
        loss_fn = MultipleNegativesRankingLoss(model, scale=1 / 0.03, gather_across_devices=True)
    loss_fn.model = ddp  # what the sentence-transformers trainer does under DDP: the loss calls the wrapped model
    # fused: what the sentence-transformers (Hugging Face) trainer picks by default with torch >= 2.8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ins = InstructionTable.load().lookup("scifact", allow_unknown=False).query[0]
    recs = [json.loads(x) for x in open(args.records)]
    prep = getattr(model, "preprocess", None) or model.tokenize
    times, toks = [], []
    for step in range(args.steps + 1):
        lo = (step * world + rank) * args.batch
        rows = recs[lo : lo + args.batch]
        cols = [[f"Instruct: {ins}\nQuery:{r['query']}" for r in rows], [r["pos"][0] for r in rows]]
        cols += [[r["neg"][j] for r in rows] for j in range(3)]
        feats = [{k: v for k, v in prep(c).items() if torch.is_tensor(v)} for c in cols]
        prof = profile(activities=[ProfilerActivity.CPU]) if step == args.profile_step else contextlib.nullcontext()
        t = time.perf_counter()
        with prof:
            with phase("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = loss_fn(feats, None)
            with phase("backward"):
                loss.backward()  # DDP reduces gradients in its backward hooks
            with phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if step == args.profile_step and rank == 0:
            Path(args.profile_out).write_text(
                json.dumps({"step_wall_s": dt, "phases_s": phase_seconds(prof)}, indent=1)
            )
            Path(args.profile_out).with_suffix(".txt").write_text(top_operators(prof))
        real = torch.tensor(float(sum(int(f["attention_mask"].sum()) for f in feats)))
        padded = torch.tensor(float(sum(f["attention_mask"].numel() for f in feats)))
        dist.all_reduce(real)
        dist.all_reduce(padded)
        if step:
            times.append(dt)
            toks.append((real.item(), padded.item()))
    rss = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        real, padded = sum(t[0] for t in toks), sum(t[1] for t in toks)
        sys.stdout.write(
            "RESULT "
            + json.dumps(
                {
                    "tokens_per_s": real / sum(times),
                    "s_per_step": statistics.median(times),
                    "padding_efficiency": real / padded,
                    "peak_rss_gb": rss.item(),
                }
            )
            + "\n"
        )
    sys.stdout.flush()
    # leave here, DDP still alive: freeing its reducer deadlocked (py-spy --native: the main thread, holding the GIL,
    # waited in ~ProcessGroupGloo for a mutex that a gloo thread held while it waited for the GIL to free a finished
    # all-reduce), leaving torchrun waiting with the result already printed
    os._exit(0)


def torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


RATIOS = {
    "stage1_vs_mnrl": ("ours-{d}", "st-{d}"),
    "stage1_z2_vs_mnrl": ("ours-z2-{d}", "st-{d}"),
    "gradcache_vs_cachedmnrl": ("ours-gc-{d}", "st-cmnrl-{d}"),
    "stage1_z0_vs_mnrl": ("ours-z0-{d}", "st-{d}"),
    "gradcache_z0_vs_cachedmnrl": ("ours-z0-gc-{d}", "st-cmnrl-{d}"),
    "stage1_z2_autocast_vs_mnrl": ("ours-z2-ac-{d}", "st-{d}"),
    "gradcache_autocast_vs_cachedmnrl": ("ours-gc-ac-{d}", "st-cmnrl-{d}"),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pypi:smollm2-135m")
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--batch", type=int, default=4, help="queries per process per step (x 5 texts)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--mini-batch",
        type=int,
        default=2,
        help="GradCache mini-batch in queries: x5 texts for CachedMNRL, x5x512 tokens for ours",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["ours-fp32", "st-fp32", "ours-gc-fp32", "st-cmnrl-fp32"],
        help="ours-[z0-|z2-][gc-][ac-]DTYPE (ZeRO-3 unless z0 or z2; gc = GradCache; ac = bf16 under torch.autocast "
        "with fp32 weights), st-DTYPE, st-cmnrl-DTYPE",
    )
    ap.add_argument("--work", default="", help="scratch folder (shards are reused; every run trains afresh)")
    ap.add_argument("--len", type=int, default=512, help="query and document max length (tokens)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--ours-args", nargs="*", default=[], help="extra trainer overrides for our configurations")
    ap.add_argument(
        "--results",
        default=str(ROOT / "bench" / "results" / "peer-cpu.json"),
        help="JSON the ratios are merged into (per length); '' = do not write",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler on the third step of each configuration (excluded from tokens/s): phase tables",
    )
    ap.add_argument("--profile-step", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--st-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--records", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global LEN
    LEN = args.len
    if args.st_worker:
        st_worker(args)  # leaves the process itself (os._exit)
    if args.profile and args.steps < PROFILE_STEP + 1:
        ap.error(f"--profile needs --steps >= {PROFILE_STEP + 1} (the profiled step is not timed)")

    from data_pipeline.beir import bm25_contrastive
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run
    from data_pipeline.text import TokenizationConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    recs = work / "scifact-train.jsonl"
    if not recs.exists():
        bm25_contrastive(Path(args.data) / "scifact", "train", recs, negatives=3, source="scifact")
    shards = work / f"shards-{LEN}"
    if not (shards / "manifest.json").exists():
        tok = TokenizationConfig(tokenizer=args.model, query_max_len=LEN, doc_max_len=LEN)
        run(
            PipelineConfig(
                kind="contrastive",
                inputs=[str(recs)],
                output=str(shards),
                samples_per_shard=200,
                tokenization=tok,
                progress=False,
            )
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # our loader shuffles with the seed; same-length statistics, not the same rows: SciFact docs are homogeneous
    rows, phases = {}, {}
    for c in args.configs:
        dtype = c.rsplit("-", 1)[1]
        t = time.perf_counter()
        if c.startswith("ours"):
            out = work / f"run-{c}-{LEN}{'-ckpt' if args.grad_ckpt else ''}"
            shutil.rmtree(out, ignore_errors=True)  # a finished run in it would be resumed, not measured
            r = torchrun(
                [
                    "-m",
                    "trainer",
                    "stage=1",
                    f"shards={shards}",
                    f"model.path={args.model}",
                    f"run.output_dir={out}",
                    f"run.max_steps={args.steps + 1}",
                    "run.save_every=1000000",
                    "run.export=false",
                    f"loader.batch_size={args.batch}",
                    "loader.negatives_per_query=3",
                    f"model.dtype={dtype}",
                    f"model.autocast={str('-ac-' in c).lower()}",
                    "optim.lr=0.00001",
                    "loss.temperature=0.03",
                    f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}",
                    f"encode.grad_cache={str('-gc-' in c).lower()}",
                    f"deepspeed.zero_stage={2 if '-z2-' in c else 0 if '-z0-' in c else 3}",
                    f"encode.chunk_tokens={args.mini_batch * 5 * LEN if '-gc-' in c else 8192}",
                    f"run.profile_step={PROFILE_STEP + 1 if args.profile else 0}",
                    *args.ours_args,
                ],
                env,
            )
            if r.returncode:
                print(f"{c}: FAILED\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
                continue
            m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            m = [x for x in m[1:] if not (args.profile and x["step"] == PROFILE_STEP + 1)]
            rows[c] = {
                "tokens_per_s": sum(x["tokens_per_s"] * x["step_time_s"] for x in m) / sum(x["step_time_s"] for x in m),
                "s_per_step": statistics.median(x["step_time_s"] for x in m),
                "padding_efficiency": m[-1]["padding_efficiency"],
                "loader_padding_efficiency": m[-1]["loader_padding_efficiency"],
                "peak_rss_gb": max(x["peak_mem_gb"] for x in m),
                "mfu": statistics.median(x["mfu"] for x in m),
                "phases_s": {k[5:-2]: statistics.median(x[k] for x in m) for k in m[-1] if k.startswith("time_")},
            }
            if args.profile:
                phases[c] = json.loads((out / "profile_phases.json").read_text())
        else:
            r = torchrun(
                [
                    __file__,
                    "--st-worker",
                    f"--len={LEN}",
                    f"--records={recs}",
                    f"--model={args.model}",
                    f"--batch={args.batch}",
                    f"--steps={args.steps}",
                    f"--dtype={dtype}",
                    f"--mini-batch={args.mini_batch * 5}",
                ]
                + (["--cached"] if "cmnrl" in c else [])
                + (["--grad-ckpt"] if args.grad_ckpt else [])
                + (
                    [f"--profile-step={PROFILE_STEP}", f"--profile-out={work / f'profile-{c}.json'}"]
                    if args.profile
                    else []
                ),
                env,
            )
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode or line is None:
                print(f"{c}: FAILED\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
                continue
            rows[c] = json.loads(line[len("RESULT ") :])
            if args.profile:
                phases[c] = json.loads((work / f"profile-{c}.json").read_text())
        rows[c]["wall_s"] = time.perf_counter() - t
        print(f"{c}: " + json.dumps(rows[c]), flush=True)
    ratios = {}
    for d in ("fp32", "bf16"):
        for name, (a, b) in RATIOS.items():
            a, b = a.format(d=d), b.format(d=d)
            if a in rows and b in rows:
                ratios[f"{name}_{LEN}_{d}"] = r = rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]
                print(
                    f"{a} / {b}: tokens/s {r:.2f}x, peak RSS per process "
                    f"{rows[a]['peak_rss_gb']:.2f} vs {rows[b]['peak_rss_gb']:.2f} GB"
                )
    from modeling.embedding import native_bf16

    native = "bf16" if native_bf16(False) else "fp32"  # what model.dtype=auto trains in on this box
    ratios.update({k[: -len(native) - 1]: v for k, v in list(ratios.items()) if k.endswith(f"_{native}")})
    # the headline keys name our default: on a CPU, zero_stage=auto is ZeRO-0 when the model states fit (SmolLM2 does)
    for key in (f"stage1_vs_mnrl_{LEN}", f"gradcache_vs_cachedmnrl_{LEN}"):
        z0 = key.replace("_vs_", "_z0_vs_")
        if z0 in ratios:
            ratios[key] = ratios[z0]
    if f"gradcache_vs_cachedmnrl_{LEN}" in ratios:
        ratios["gradcache_vs_cachedmnrl"] = ratios[f"gradcache_vs_cachedmnrl_{LEN}"]
    if phases:
        print(phase_table(phases))
    result = {
        "machine": record.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": record.commit(),
        "len": LEN,
        "batch": args.batch,
        "steps": args.steps,
        "grad_ckpt": args.grad_ckpt,
        "ours_args": args.ours_args,
        "ratios": ratios,
        "rows": rows,
        "profiles": phases,
    }
    (work / "peer_throughput.json").write_text(json.dumps(result, indent=1))
    print(f"results: {work / 'peer_throughput.json'}")
    if args.results:
        record.merge(Path(args.results), result["ratios"], f"len{LEN}{'-ckpt' if args.grad_ckpt else ''}", result)
    return 0


def phase_table(phases: dict) -> str:
    """Markdown: seconds per phase row (rank 0's profiled step), one column per configuration."""
    names = list(phases)
    keys = sorted({k for p in phases.values() for k in p["phases_s"]})
    lines = ["| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{phases[n]['phases_s'].get(k, 0.0):.2f}" for n in names) + " |")
    lines.append("| **step wall time** | " + " | ".join(f"{phases[n]['step_wall_s']:.2f}" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
