"""Stage-2 InfoNCE negatives across ranks (ours) or per rank (the official stage-2 script), chosen on a dev split.

    python -m experiments.stage2_negatives --out runs/stage2-negatives --seeds 0 1

For each seed: the main job (`launch.main`, which trains stage 2 with `loss.negatives_cross_device=true`), then the
same stage 2 again from the same stage-1 export with `loss.negatives_cross_device=false` (the main job's saved
stage-2 config, only that and the output folder changed), both on 2 ranks. Both stage-2 exports are scored on the
demo's **dev world** (`demo_corpus.generate(seed=1)`: other species, its own held-out queries, BM25 top-30), never on
the main job's held-out queries. Writes results.json (NDCG@10 per seed and mode, and paired tests with per-query
scores averaged over the seeds) and per_query.json keyed by seed (experiments/proof_tables.py's shape).
Decision rule, fixed before any result was seen: stage 2's `auto` stays "across ranks" (the trainer's behaviour
until now, and stage 1's) unless "per rank" scores higher on dev listwise NDCG@10 with a paired p < 0.05 (per-query
scores averaged over the seeds run). (Two seeds were planned; on the 2-core box of 2026-12-07 one fitted the session.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"stage2": "across ranks (ours)", "stage2-local": "per rank (official stage-2 script)"}


def log(msg: str) -> None:
    print(f"[negs {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(seed_dir: Path, seed: int) -> None:
    if not (seed_dir / "results.json").is_file():
        log(f"seed {seed}: main job")
        subprocess.run([sys.executable, "-m", "launch.main", "--out", str(seed_dir), "--seed", str(seed)], cwd=ROOT,
                       check=True)
    local = seed_dir / "stage2-local"
    if not (local / "export" / "e2rank.json").is_file():
        log(f"seed {seed}: stage 2 with negatives per rank")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "trainer", "--config", str(seed_dir / "stage2" / "config.yaml"),
                        f"run.output_dir={local}", "loss.negatives_cross_device=false",
                        "tracking.run_name=stage2-local"], cwd=ROOT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})


def score(out: Path, seeds: list[int]) -> dict:
    import torch

    from data_pipeline import demo_corpus
    from data_pipeline.instructions import InstructionTable
    from evaluation.metrics import paired_test, per_query_of_run
    from evaluation.readers import load_beir
    from evaluation.reranker import Reranker
    from evaluation.scoring import evaluate
    from experiments.proof_tables import pooled
    from launch.main import _bm25_run

    torch.set_num_threads(2)
    dev = out / "dev-world"
    if not (dev / "eval" / "qrels" / "test.tsv").is_file():
        demo_corpus.generate(dev, seed=1)
    es = load_beir(dev / "eval", "test", _bm25_run(dev / "eval", 30), top_k=30)
    ins = InstructionTable.load().lookup("demo", False)
    res, pq = {}, {}
    for seed in seeds:
        runs = out / f"seed{seed}" / "dev-runs"
        for tag in SETTINGS:
            model = Reranker.from_pretrained(out / f"seed{seed}" / tag / "export")
            r = evaluate(model, es, query_instruction=ins.query[0], rerank_instruction=ins.rerank, prompt_k=10,
                         out_dir=runs, tag=tag, progress=False)
            res.setdefault(f"seed{seed}", {})[tag] = {m: r[m]["NDCG@10"] for m in ("retrieval", "listwise")}
            for m in ("retrieval", "listwise"):
                pq.setdefault(f"seed{seed}", {})[f"dev.{tag}.{m}"] = per_query_of_run(es.qrels, runs, es.name, tag, m)
            log(f"seed {seed} {tag}: {res[f'seed{seed}'][tag]}")
    tests = {}
    for m in ("retrieval", "listwise"):
        a, _ = pooled(pq, f"dev.stage2-local.{m}")
        b, _ = pooled(pq, f"dev.stage2.{m}")
        tests[f"{m}: across ranks vs per rank"] = paired_test(a, b)
    mean = {tag: sum(res[s][tag]["listwise"] for s in res) / len(res) for tag in SETTINGS}
    t = tests["listwise: across ranks vs per rank"]
    choice = "stage2-local" if t["diff"] < 0 and t["p_ttest"] < 0.05 else "stage2"
    summary = {"dev_queries": len(es.qrels), "ndcg10": res, "paired_tests_seeds_pooled": tests,
               "mean_dev_listwise": mean, "choice": {"stage2": SETTINGS[choice]}}
    for name, obj in (("results.json", summary), ("per_query.json", pq)):
        (out / name).write_text(json.dumps(obj, indent=1, sort_keys=name == "per_query.json") + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/stage2-negatives"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    out = args.out.resolve()
    for seed in args.seeds:
        train(out / f"seed{seed}", seed)
    print(json.dumps(score(out, args.seeds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
