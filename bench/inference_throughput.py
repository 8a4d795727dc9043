"""Documents/s of the Reranker (the evaluation and inference path), before and after, in the same run, and NDCG@10
of fp32 vs bf16 on SciFact test.

    python bench/inference_throughput.py [--docs 200] [--baseline-rev 0966aa4] [--ndcg-queries 30]

- before: the Reranker at `--baseline-rev` (a git worktree of that commit; fp32, as it loaded models), same docs;
- after: this tree, fp32 and bf16 (auto picks bf16 on CPUs with AMX/AVX512-BF16);
- quality: retrieval and listwise NDCG@10 of the base model on the first `--ndcg-queries` SciFact test queries
  (BM25 top-100), fp32 vs bf16, with a paired t-test over queries.
Model: SmolLM2-135M (last-token pooling), documents cut to 512 tokens, every core of this machine.
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
from bench import record  # noqa: E402
from modeling.embedding import native_bf16  # noqa: E402

MEASURE = r"""
import json, os, sys, time, torch
torch.set_num_threads(os.cpu_count())
from evaluation.readers import load_corpus
from data_pipeline.text import TokenizationConfig
from evaluation.reranker import Reranker
corpus = load_corpus(sys.argv[1])
docs = [corpus[d] for d in sorted(corpus)[: int(sys.argv[2])]]
kw = {} if sys.argv[4] == "legacy" else {"dtype": sys.argv[4]}
tok = TokenizationConfig(tokenizer=sys.argv[3], doc_max_len=512)
r = Reranker.from_base(sys.argv[3], pooling="last", tokenization=tok, **kw)
r.embed(docs[:8])
t = time.perf_counter()
e = r.embed(docs)
dt = time.perf_counter() - t
tokens = sum(len(x) for x in r.text.encode_documents(docs))
print("RESULT " + json.dumps({"docs_per_s": len(docs) / dt, "seconds": dt, "tokens": tokens}))
"""

# sentence-transformers encode() on the same documents, model, pooling (last token), normalisation, dtype and threads
MEASURE_ST = r"""
import json, os, sys, time, torch
torch.set_num_threads(os.cpu_count())
from sentence_transformers import SentenceTransformer, models
from common.pretrained import resolve
from evaluation.readers import load_corpus
corpus = load_corpus(sys.argv[1])
docs = [corpus[d] for d in sorted(corpus)[: int(sys.argv[2])]]
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[4]]
tr = models.Transformer(str(resolve(sys.argv[3], weights=True)), max_seq_length=512,
                        model_kwargs={"attn_implementation": "sdpa", "dtype": dt})
dim = tr.get_embedding_dimension() if hasattr(tr, "get_embedding_dimension") else tr.get_word_embedding_dimension()
m = SentenceTransformer(modules=[tr, models.Pooling(dim, "lasttoken"), models.Normalize()], device="cpu")
m.encode(docs[:8])
t = time.perf_counter()
e = m.encode(docs, batch_size=32)
sec = time.perf_counter() - t
tok = m.tokenizer(docs, truncation=True, max_length=512)["input_ids"]
print("RESULT " + json.dumps({"docs_per_s": len(docs) / sec, "seconds": sec, "tokens": sum(len(x) for x in tok)}))
"""


def measure(cwd: Path, corpus: Path, n: int, model: str, dtype: str, script: str = MEASURE) -> dict:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": str(os.cpu_count())}
    r = subprocess.run(
        [sys.executable, "-c", script, str(corpus), str(n), model, dtype],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(line[7:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--model", default="pypi:smollm2-135m")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--baseline-rev", default="0966aa4")
    ap.add_argument("--ndcg-queries", type=int, default=30)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="this tree's precisions to measure")
    ap.add_argument(
        "--vs-st",
        action="store_true",
        help="also sentence-transformers encode() per dtype, same run; "
        "the ratio in the dtype `auto` picks on this CPU goes to bench/results/peer-cpu.json as "
        "inference_vs_st_encode",
    )
    args = ap.parse_args()
    data = Path(args.data) / "scifact"
    rows = {}
    if args.vs_st:
        ratios, run = {}, {}
        for dt in args.dtypes:
            ours = measure(ROOT, data / "corpus.jsonl", args.docs, args.model, dt)
            st = measure(ROOT, data / "corpus.jsonl", args.docs, args.model, dt, MEASURE_ST)
            # tokens/s: ours counts its text contract's tokens (EOS included), ST its tokenizer's
            r = (ours["tokens"] / ours["seconds"]) / (st["tokens"] / st["seconds"])
            run[dt] = {"ours": ours, "st": st, "tokens_per_s_ratio": r}
            print(
                f"{dt}: ours {ours['docs_per_s']:.2f} docs/s ({ours['tokens'] / ours['seconds']:.0f} tok/s), "
                f"sentence-transformers encode() {st['docs_per_s']:.2f} docs/s ({st['tokens'] / st['seconds']:.0f} "
                f"tok/s): {r:.2f}x tokens/s",
                flush=True,
            )
            ratios[f"inference_vs_st_encode_{dt}"] = r
            if dt == ("bf16" if native_bf16(False) else "fp32"):  # the plain key: what dtype=auto evaluates in here
                ratios["inference_vs_st_encode"] = r
        record.merge(record.RESULTS / "peer-cpu.json", ratios, "inference", {"docs": args.docs, **run})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(wt), args.baseline_rev],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            rows[f"before ({args.baseline_rev}, fp32)"] = measure(
                wt, data / "corpus.jsonl", args.docs, args.model, "legacy"
            )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
    for dt in args.dtypes:
        rows[f"after ({dt})"] = measure(ROOT, data / "corpus.jsonl", args.docs, args.model, dt)
    base = next(iter(rows.values()))["docs_per_s"]
    for k, v in rows.items():
        print(f"{k}: {v['docs_per_s']:.2f} documents/s ({v['docs_per_s'] / base:.2f}x before)", flush=True)

    if args.ndcg_queries:
        import numpy as np
        import torch
        from scipy.stats import ttest_rel

        from data_pipeline.instructions import InstructionTable
        from data_pipeline.text import TokenizationConfig
        from evaluation.readers import load_beir
        from evaluation.reranker import Reranker
        from evaluation.scoring import evaluate

        torch.set_num_threads(os.cpu_count() or 1)
        es = load_beir(data, "test", data / "runs" / "bm25.top100.test.trec")
        keep = sorted(es.run)[: args.ndcg_queries]
        es.run = {q: es.run[q] for q in keep}
        ins = InstructionTable.load().lookup("scifact", False)
        tok = TokenizationConfig(tokenizer=args.model, doc_max_len=512, prompt_max_len=2048)
        per = {}
        with tempfile.TemporaryDirectory() as tmp:
            for dt in ("fp32", "bf16"):
                r = Reranker.from_base(args.model, pooling="last", tokenization=tok, dtype=dt)
                res = evaluate(
                    r,
                    es,
                    query_instruction=ins.query[0],
                    rerank_instruction=ins.rerank,
                    out_dir=Path(tmp),
                    tag=dt,
                    progress=False,
                )
                per[dt] = {
                    m: per_query_ndcg(es.qrels, Path(tmp) / f"{es.name}.{dt}.{m}.trec")
                    for m in ("retrieval", "listwise")
                }
                print(
                    f"NDCG@10 {dt}: retrieval {res['retrieval']['NDCG@10']:.4f} "
                    f"listwise {res['listwise']['NDCG@10']:.4f}"
                    f" ({len(es.run)} queries)",
                    flush=True,
                )
        for m in ("retrieval", "listwise"):
            a = np.array([per["fp32"][m][q] for q in sorted(per["fp32"][m])])
            b = np.array([per["bf16"][m][q] for q in sorted(per["fp32"][m])])
            p = ttest_rel(a, b).pvalue if np.any(a != b) else 1.0
            print(f"{m}: bf16 - fp32 = {b.mean() - a.mean():+.4f} NDCG@10, paired t-test p = {p:.3f}")
    return 0


def per_query_ndcg(qrels, run_file: Path) -> dict[str, float]:
    import pytrec_eval

    run: dict[str, dict[str, float]] = {}
    for line in run_file.read_text().splitlines():
        q, _, d, _, s, _ = line.split()
        run.setdefault(q, {})[d] = float(s)
    return {
        q: v["ndcg_cut_10"] for q, v in pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run).items()
    }


if __name__ == "__main__":
    raise SystemExit(main())
