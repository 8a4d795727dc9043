"""Proof on real data: train stage 1 then stage 2 on SciFact train, evaluate on SciFact test and NovelEval.

    python -m experiments.scifact_encoder_proof --out runs/scifact [--model pypi:all-minilm-l6-v2]

Steps (each one's output is reused when it exists, so a re-run resumes):
1. stage-1 data: SciFact train queries, positives from qrels/train.tsv, 7 BM25 hard negatives (bm25s);
2. stage-2 data: the same train queries, slates of `--slate` candidates from the BM25 top-30: the qrels positives
   first, the rest ordered by the teacher, reciprocal-rank fusion of BM25 and the base model's cosine (stronger than
   BM25 alone; see README);
3. the Ray pipeline pre-tokenizes both; the trainer runs stage 1, then stage 2 from the stage-1 export, each as a
   real `torchrun` job with DeepSpeed ZeRO-3 on 2 processes;
4. evaluation: BM25, the base model, stage 1 (retrieval), stage 2 (retrieval), stage 2 (listwise), on SciFact test
   (BM25 top-100) and NovelEval; a Markdown table in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data_pipeline.beir import bm25_contrastive, bm25_search
from data_pipeline.config import PipelineConfig
from data_pipeline.instructions import InstructionTable
from data_pipeline.job import run as run_pipeline
from data_pipeline.text import TokenizationConfig
from evaluation.readers import load_corpus, load_qrels, load_queries
from evaluation.reranker import Reranker
from evaluation.scoring import evaluate
from experiments.sets import real_sets

ROOT = Path(__file__).resolve().parents[1]


def listwise_records(data: Path, base: Reranker, out: Path, slate: int, instr: str) -> int:
    corpus, queries, qrels = (
        load_corpus(data / "corpus.jsonl"),
        load_queries(data / "queries.jsonl"),
        load_qrels(data / "qrels" / "train.tsv"),
    )
    qids = [q for q in sorted(qrels) if q in queries]
    top = bm25_search(corpus, {q: queries[q] for q in qids}, 30)
    hits = [top[q] for q in qids]
    cand = {d for row in hits for d in row}
    demb = base.embed_documents({d: corpus[d] for d in cand})
    qemb = base.embed_queries([queries[q] for q in qids], instr)
    n = 0
    with open(out, "w") as f:
        for qi, (q, row) in enumerate(zip(qids, hits)):
            pos = [d for d, s in sorted(qrels[q].items()) if s > 0 and d in corpus]
            rest = [d for d in row if d not in pos]
            cos = {d: float(demb[d] @ qemb[qi]) for d in rest}
            by_cos = {d: r for r, d in enumerate(sorted(rest, key=lambda d: -cos[d]))}
            rrf = {d: 1 / (60 + r) + 1 / (60 + by_cos[d]) for r, d in enumerate(rest)}
            ranked = pos + sorted(rest, key=lambda d: -rrf[d])
            ranked = ranked[:slate]
            rng = np.random.default_rng(int(q))
            stored = list(rng.permutation(ranked))
            rec = {
                "query": queries[q],
                "document": [corpus[d] for d in stored],
                "ranking": [stored.index(d) + 1 for d in ranked],
                "source": "scifact",
            }
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def torchrun(args: list[str], log: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer",
        *args,
    ]
    with open(log, "a") as lf:
        r = subprocess.run(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"training failed: see {log}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/scifact")
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--model", default="pypi:all-minilm-l6-v2")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--slate", type=int, default=10)
    ap.add_argument("--stage1-steps", type=int, default=50)
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--doc-len", type=int, default=128)
    ap.add_argument("--eval-queries", type=int, default=0, help="0 = all 300 SciFact test queries")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # encoding here is one process: use every core (training ranks use 1)
    t0 = time.time()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    ins = InstructionTable.load().lookup("scifact", False)
    tok = TokenizationConfig(
        tokenizer=args.model, query_max_len=64, doc_max_len=args.doc_len, prompt_max_len=512, prompt_doc_max_len=48
    )
    base = Reranker.from_base(args.model, pooling=args.pooling, tokenization=tok, batch_size=64)
    s1, s2 = out / "stage1.jsonl", out / "stage2.jsonl"
    if not s1.exists():
        print(
            "[proof] stage-1 data: "
            f"{bm25_contrastive(data / 'scifact', 'train', s1, negatives=7, source='scifact')} records"
        )
    if not s2.exists():
        print(f"[proof] stage-2 data: {listwise_records(data / 'scifact', base, s2, args.slate, ins.query[0])} slates")
    for kind, src in (("contrastive", s1), ("listwise", s2)):
        run_pipeline(
            PipelineConfig(
                kind=kind,
                inputs=[str(src)],
                output=str(out / f"shards-{kind}"),
                samples_per_shard=200,
                tokenization=tok,
                progress=False,
            )
        )
    common = [f"model.pooling={args.pooling}", "model.dtype=fp32", "deepspeed.zero_stage=3", "run.save_every=1000"]
    t1 = time.time()
    torchrun(
        [
            "stage=1",
            f"shards={out / 'shards-contrastive'}",
            f"model.path={args.model}",
            f"run.output_dir={out / 'stage1'}",
            "loader.batch_size=8",
            "loader.negatives_per_query=3",
            "optim.lr=0.00003",
            "optim.warmup_steps=5",
            f"run.max_steps={args.stage1_steps}",
            "loss.temperature=0.05",
            *common,
        ],
        log,
    )
    t2 = time.time()
    torchrun(
        [
            "stage=2",
            f"shards={out / 'shards-listwise'}",
            f"model.path={out / 'stage1' / 'export'}",
            f"run.output_dir={out / 'stage2'}",
            "loader.batch_size=4",
            "optim.lr=0.00002",
            "optim.warmup_steps=5",
            f"run.max_steps={args.stage2_steps}",
            "loss.temperature=0.05",
            *common,
        ],
        log,
    )
    t3 = time.time()
    sets = real_sets(data)
    if args.eval_queries:
        keep = sorted(sets["scifact"].run)[: args.eval_queries]
        sets["scifact"].run = {q: sets["scifact"].run[q] for q in keep}
    models = {
        "base": base,
        "stage1": Reranker.from_pretrained(out / "stage1" / "export", batch_size=64),
        "stage2": Reranker.from_pretrained(out / "stage2" / "export", batch_size=64),
    }
    res = {}
    for name, es in sets.items():
        for tag, m in models.items():
            modes = ("retrieval", "listwise")
            res[(name, tag)] = evaluate(
                m,
                es,
                query_instruction=ins.query[0],
                rerank_instruction=ins.rerank,
                modes=modes,
                out_dir=out / "eval",
                tag=tag,
            )
    t4 = time.time()
    cols = [
        ("base", "retrieval"),
        ("base", "listwise"),
        ("stage1", "retrieval"),
        ("stage1", "listwise"),
        ("stage2", "retrieval"),
        ("stage2", "listwise"),
    ]
    rows = [
        "| set, NDCG@10 | BM25 (first stage) | " + " | ".join(f"{t}, {m}" for t, m in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name in sets:
        first = res[(name, "base")]
        cells = [f"{res[(name, t)][m]['NDCG@10']:.4f}" for t, m in cols]
        rows.append(
            f"| {name} ({first['queries']} q) | {first['first_stage']['NDCG@10']:.4f} | " + " | ".join(cells) + " |"
        )
    table = "\n".join(rows)
    timing = (
        f"data+pipeline {t1 - t0:.0f}s, stage 1 {t2 - t1:.0f}s, stage 2 {t3 - t2:.0f}s, evaluation {t4 - t3:.0f}s, "
        f"total {t4 - t0:.0f}s"
    )
    (out / "results.md").write_text(table + "\n\n" + timing + "\n")
    (out / "results.json").write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in res.items()}, indent=1))
    print(table)
    print(timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
