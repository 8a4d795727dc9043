"""Reranking latency per query: E2Rank's listwise mode against pointwise scoring with the same backbone.

    python bench/rerank_latency.py [--model pypi:smollm2-135m] [--queries 10] [--data ../shared/data]

SciFact test queries with their BM25 top-100 (real data), in the same process and run:
- E2Rank, warm: the documents' retrieval embeddings exist (they are the first-stage index); one forward of the
  listwise prompt built from the top 20, then 100 dot products (`Reranker.rerank(..., doc_embeddings=...)`);
- E2Rank, cold: the 100 documents are encoded too, then the prompt (nothing reused);
- pointwise: one forward per query-document pair ("Query: q\\nDocument: d", as a cross-encoder reads it), the 100
  pairs in length-grouped batches, score from the last token; the backbone's cost is the same as a cross-encoder's.
Prints milliseconds per query (median over queries) and the ratios pointwise / E2Rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pypi:smollm2-135m")
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--prompt-k", type=int, default=20)
    ap.add_argument("--doc-len", type=int, default=256)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    import torch

    from data_pipeline.instructions import InstructionTable
    from data_pipeline.text import TokenizationConfig
    from evaluation.readers import load_beir
    from evaluation.reranker import Reranker

    torch.set_num_threads(os.cpu_count() or 1)
    d = Path(args.data) / "scifact"
    es = load_beir(d, "test", d / "runs" / "bm25.top100.test.trec", top_k=args.top_k)
    qids = sorted(es.run)[: args.queries]
    tok = TokenizationConfig(query_max_len=64, doc_max_len=args.doc_len, prompt_max_len=2048, prompt_doc_max_len=96)
    rer = Reranker.from_base(args.model, pooling="last", tokenization=tok, batch_size=64)
    ins = InstructionTable.load().lookup("scifact", False)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(fn, *a, **kw):
        sync()
        t = time.perf_counter()
        fn(*a, **kw)
        sync()
        return time.perf_counter() - t

    pair_max = tok.query_max_len + tok.doc_max_len
    warm, cold, point = [], [], []
    rer.embed(["warm-up"] * 4)
    for q in qids:
        docs = [es.corpus[x] for x in es.run[q]]
        query = es.queries[q]
        demb = rer.embed(docs)  # the first-stage index (not timed for the warm case)
        warm.append(timed(rer.rerank, query, docs, ins.rerank, args.prompt_k, doc_embeddings=demb))
        cold.append(timed(rer.rerank, query, docs, ins.rerank, args.prompt_k))
        pairs = rer.text._encode([f"Query: {query}\nDocument: {x}" for x in docs], pair_max)[0]
        point.append(timed(rer._encode_ids, pairs))
    ms = {
        k: 1000 * statistics.median(v) for k, v in (("e2rank_warm", warm), ("e2rank_cold", cold), ("pointwise", point))
    }
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": str(rer.dtype),
        "queries": len(qids),
        "top_k": args.top_k,
        "prompt_k": args.prompt_k,
        "doc_len": args.doc_len,
        "ms_per_query": {k: round(v, 1) for k, v in ms.items()},
        "pointwise_over_e2rank_warm": round(ms["pointwise"] / ms["e2rank_warm"], 2),
        "pointwise_over_e2rank_cold": round(ms["pointwise"] / ms["e2rank_cold"], 2),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
