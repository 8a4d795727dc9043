"""How many first-stage documents the listwise prompt should hold: an inference-time ablation of one export.

    python -m experiments.prompt_size --model runs/cpuproof/train/stage2-grades-lr0.0001-t0.05-seed0/export \
        --dev runs/cpuproof/scifact-dev --out runs/cpuproof/prompt-size

The paper puts the first-stage top 20 in the prompt and scores the top 100 ([paper] §4.2); our stage-2 slates hold 16
documents, so a trained prompt never had 20. Each size in `--ks` scores the dev split (the 100 SciFact train queries
that `scifact_proof prepare` held out, BM25 top 50); the size with the best dev listwise NDCG@10 is the choice, and
only then is SciFact test scored: retrieval, listwise at the paper's 20 and at the choice, with paired tests. Document
embeddings are computed once per set and reused by every prompt size (the Reranker caches them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an export (trainer output folder's export/)")
    ap.add_argument("--dev", required=True, help="the dev BEIR folder written by `scifact_proof prepare`")
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 16, 20])
    ap.add_argument("--paper-k", type=int, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-queries", type=int, default=0, help="queries per set (0 = all; a dry run uses few)")
    args = ap.parse_args(argv)

    from data_pipeline.instructions import InstructionTable
    from evaluation.metrics import paired_test, per_query_of_run
    from evaluation.readers import load_eval_set
    from evaluation.reranker import Reranker
    from evaluation.scoring import evaluate
    from experiments.sets import real_sets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rer = Reranker.from_pretrained(args.model, batch_size=64)
    ins = InstructionTable.load().lookup("scifact", False)
    kw = dict(query_instruction=ins.query[0], rerank_instruction=ins.rerank, out_dir=out, progress=False)
    res: dict = {"model": str(args.model), "dtype": str(rer.dtype).replace("torch.", ""), "dev": {}, "test": {}}

    def log(msg: str) -> None:
        print(f"[prompt-size {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    dev = load_eval_set(
        args.dev, split="dev", run=Path(args.dev) / "runs" / "bm25.dev.trec", max_queries=args.max_queries or 100
    )
    for i, k in enumerate(sorted(args.ks, reverse=True)):  # retrieval once; documents are cached after the first
        r = evaluate(
            rer, dev, modes=("retrieval", "listwise") if i == 0 else ("listwise",), prompt_k=k, tag=f"k{k}", **kw
        )
        if i == 0:
            res["dev"]["retrieval"] = r["retrieval"]["NDCG@10"]
        res["dev"][f"listwise_k{k}"] = r["listwise"]["NDCG@10"]
        log(f"dev k={k}: listwise {r['listwise']['NDCG@10']:.4f} (retrieval {res['dev']['retrieval']:.4f})")
    best = max(args.ks, key=lambda k: (res["dev"][f"listwise_k{k}"], k == args.paper_k))
    res["chosen_k"] = best
    log(f"chosen on dev: k={best}")

    sci = real_sets(args.data, args.max_queries)["scifact"]
    for i, k in enumerate(sorted({args.paper_k, best}, reverse=True)):
        r = evaluate(
            rer, sci, modes=("retrieval", "listwise") if i == 0 else ("listwise",), prompt_k=k, tag=f"k{k}", **kw
        )
        if i == 0:
            res["test"]["retrieval"] = r["retrieval"]["NDCG@10"]
            res["test"]["bm25"] = r["first_stage"]["NDCG@10"]
        res["test"][f"listwise_k{k}"] = r["listwise"]["NDCG@10"]
        log(f"test k={k}: listwise {r['listwise']['NDCG@10']:.4f} (retrieval {res['test']['retrieval']:.4f})")

    q = sci.qrels
    tag_ret = f"k{max(args.paper_k, best)}"  # retrieval and BM25 were scored with the first (largest) k's tag
    runs = {
        "retrieval": per_query_of_run(q, out, "scifact", tag_ret, "retrieval"),
        "bm25": per_query_of_run(q, out, "scifact", tag_ret, "first_stage"),
        **{f"listwise_k{k}": per_query_of_run(q, out, "scifact", f"k{k}", "listwise") for k in {args.paper_k, best}},
    }
    pairs = [
        (f"listwise_k{best}", f"listwise_k{args.paper_k}"),
        (f"listwise_k{best}", "retrieval"),
        (f"listwise_k{args.paper_k}", "retrieval"),
        (f"listwise_k{best}", "bm25"),
    ]
    res["paired"] = [{"b": b, "a": a, **paired_test(runs[a], runs[b])} for b, a in pairs if a != b]
    for t in res["paired"]:
        log(
            f"test {t['b']} vs {t['a']}: {t['mean_a']:.4f} -> {t['mean_b']:.4f} ({t['diff']:+.4f} "
            f"[{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}], p={t['p_ttest']:.2g})"
        )
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
