"""BEIR-format sets (corpus.jsonl, queries.jsonl, qrels/*.tsv) and training data built from them.

Stage-1 records from a BEIR split: positives from the qrels, hard negatives from BM25 (bm25s) over the corpus,
excluding every judged-relevant document of the query.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.readers import load_corpus, load_qrels, load_queries


def bm25_search(corpus: dict[str, str], queries: dict[str, str], k: int) -> dict[str, list[str]]:
    """BM25 top-k document ids per query, best first: bm25s with Lucene's k1=0.9, b=0.4 (the BEIR/Pyserini setting)
    and English stopwords. The one BM25 of the project."""
    import bm25s

    ids = sorted(corpus)
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize([corpus[i] for i in ids], stopwords="en", show_progress=False), show_progress=False)
    qids = list(queries)
    if not qids:
        return {}
    hits, _ = retriever.retrieve(bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False),
                                 k=min(k, len(ids)), show_progress=False)
    return {q: [ids[j] for j in row] for q, row in zip(qids, hits)}


def write_qrels(path: Path, qrels: dict[str, dict[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in sorted(qrels):
            for d, s in sorted(qrels[q].items()):
                f.write(f"{q}\t{d}\t{s}\n")


def split_dev(beir_dir: str | Path, out_dir: str | Path, *, split: str = "train", dev_queries: int = 100,
              seed: int = 0, depth: int = 100) -> Path:
    """A BEIR folder whose `split` lost `dev_queries` random queries to a `dev` split, with a BM25 top-`depth` run
    for them (runs/bm25.dev.trec): learning curves and choices are made on it, never on the test split. The corpus
    and queries are linked, not copied."""
    import random

    src, out = Path(beir_dir), Path(out_dir)
    qrels = load_qrels(src / "qrels" / f"{split}.tsv")
    qids = sorted(qrels)
    dev = set(random.Random(seed).sample(qids, dev_queries))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        link = out / name
        if not link.exists():
            link.symlink_to((src / name).resolve())
    write_qrels(out / "qrels" / f"{split}.tsv", {q: qrels[q] for q in qids if q not in dev})
    write_qrels(out / "qrels" / "dev.tsv", {q: qrels[q] for q in qids if q in dev})
    corpus, queries = load_corpus(src / "corpus.jsonl"), load_queries(src / "queries.jsonl")
    run = bm25_search(corpus, {q: queries[q] for q in sorted(dev) if q in queries}, depth)
    (out / "runs").mkdir(exist_ok=True)
    with open(out / "runs" / "bm25.dev.trec", "w") as f:
        for q, docs in run.items():
            for r, d in enumerate(docs, 1):
                f.write(f"{q} Q0 {d} {r} {-r} bm25\n")
    return out


def bm25_contrastive(
    beir_dir: str | Path,
    split: str,
    out_path: str | Path,
    *,
    negatives: int = 7,
    source: str | None = None,
    max_queries: int | None = None,
) -> int:
    """Write {query,pos,neg,source} JSONL for `split`; returns the number of records."""
    d = Path(beir_dir)
    corpus, queries, qrels = (
        load_corpus(d / "corpus.jsonl"),
        load_queries(d / "queries.jsonl"),
        load_qrels(d / "qrels" / f"{split}.tsv"),
    )
    qids = [q for q in sorted(qrels) if q in queries][:max_queries]
    hits = bm25_search(corpus, {q: queries[q] for q in qids}, negatives + 10)
    n = 0
    with open(out_path, "w") as f:
        for q in qids:
            pos = [corpus[c] for c, s in sorted(qrels[q].items()) if s > 0 and c in corpus]
            neg = [corpus[d] for d in hits[q] if qrels[q].get(d, 0) <= 0][:negatives]
            if pos:
                f.write(json.dumps({"query": queries[q], "pos": pos, "neg": neg, "source": source or d.name}) + "\n")
                n += 1
    return n
