"""BEIR-format sets (corpus.jsonl, queries.jsonl, qrels/*.tsv) and training data built from them.

Stage-1 records from a BEIR split: positives from the qrels, hard negatives from BM25 (bm25s) over the corpus,
excluding every judged-relevant document of the query.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def load_corpus(path: Path) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            title = (d.get("title") or "").strip()
            out[str(d["_id"])] = (title + ". " if title else "") + d["text"]
    return out


def load_queries(path: Path) -> dict[str, str]:
    with open(path) as f:
        return {str(d["_id"]): d["text"] for d in map(json.loads, f)}


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    return qrels


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
    import bm25s

    d = Path(beir_dir)
    corpus, queries, qrels = (
        load_corpus(d / "corpus.jsonl"),
        load_queries(d / "queries.jsonl"),
        load_qrels(d / "qrels" / f"{split}.tsv"),
    )
    ids = sorted(corpus)
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize([corpus[i] for i in ids], stopwords="en", show_progress=False), show_progress=False)
    qids = [q for q in sorted(qrels) if q in queries][:max_queries]
    hits, _ = retriever.retrieve(
        bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False),
        k=negatives + 10,
        show_progress=False,
    )
    n = 0
    with open(out_path, "w") as f:
        for q, row in zip(qids, hits):
            pos = [corpus[c] for c, s in sorted(qrels[q].items()) if s > 0 and c in corpus]
            neg = [corpus[ids[j]] for j in row if qrels[q].get(ids[j], 0) <= 0][:negatives]
            if pos:
                f.write(json.dumps({"query": queries[q], "pos": pos, "neg": neg, "source": source or d.name}) + "\n")
                n += 1
    return n
