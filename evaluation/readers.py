"""The one set of readers for ranking data: BEIR folders (corpus.jsonl, queries.jsonl, qrels/*.tsv), TREC qrels and
run files, and RankGPT / rank_llm `data.json` slates, into an `EvalSet` (the candidates to rerank per query).

Skipped inputs (queries without qrels or candidates, run entries naming unknown documents) are counted in
`EvalSet.skipped`, never silently dropped. Imports nothing else from this project: the data pipeline reads BEIR
training splits with it too.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
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


@dataclass
class EvalSet:
    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    run: dict[str, list[str]]  # first-stage candidates per query, best first
    skipped: Counter = field(default_factory=Counter)


def read_trec_run(path: Path) -> dict[str, list[tuple[str, float]]]:
    rows: dict[str, list[tuple[int, str, float]]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(
                    f"{path}:{n}: a TREC run line has 6 fields (qid Q0 docid rank score tag), got {len(parts)}"
                )
            qid, _, doc, rank, score, _ = parts
            rows.setdefault(qid, []).append((int(rank), doc, float(score)))
    return {q: [(d, s) for _, d, s in sorted(v)] for q, v in rows.items()}


def write_trec_run(path: Path, run: dict[str, dict[str, float]], tag: str) -> None:
    with open(path, "w") as f:
        for q in sorted(run):
            for rank, (d, s) in enumerate(sorted(run[q].items(), key=lambda x: (-x[1], x[0])), 1):
                f.write(f"{q} Q0 {d} {rank} {s:.6f} {tag}\n")


def load_beir(path: str | Path, split: str = "test", run_file: str | Path | None = None, top_k: int = 100) -> EvalSet:
    d = Path(path)
    corpus, queries = load_corpus(d / "corpus.jsonl"), load_queries(d / "queries.jsonl")
    qrels = load_qrels(d / "qrels" / f"{split}.tsv")
    skipped = Counter()
    run: dict[str, list[str]] = {}
    if run_file is None:
        raise ValueError("a first-stage run file (TREC format) is needed: --run PATH")
    for q, hits in read_trec_run(Path(run_file)).items():
        if q not in qrels:
            skipped["query_without_qrels"] += 1
            continue
        if q not in queries:
            skipped["query_not_in_queries"] += 1
            continue
        docs = []
        for doc, _ in hits[:top_k]:
            if doc in corpus:
                docs.append(doc)
            else:
                skipped["unknown_doc_in_run"] += 1
        if docs:
            run[q] = docs
        else:
            skipped["empty_candidate_list"] += 1
    skipped["qrels_query_without_run"] = sum(1 for q in qrels if q not in run and q in queries)
    return EvalSet(d.name, corpus, queries, {q: qrels[q] for q in run}, run, skipped)


def query_text(item: dict, where: str) -> tuple[str, str | None]:
    """RankGPT's "query": "text", or rank_llm's "query": {"text", "qid"} -> (text, qid or None)."""
    q = item.get("query")
    if isinstance(q, str):
        return q, None
    if isinstance(q, dict) and isinstance(q.get("text"), str):
        return q["text"], None if q.get("qid") is None else str(q["qid"])
    raise ValueError(
        f'{where}: \'query\' must be a string or {{"text": ..., "qid": ...}} (rank_llm), got {type(q).__name__}'
    )


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels (`qid 0 docid grade`); a missing file or one without a single judgement is an error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"qrels file {p} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    for line in p.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].lstrip("-").isdigit():
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    if not qrels:
        raise ValueError(f"qrels file {p} holds no judgement (expected lines `qid 0 docid grade`)")
    return qrels


def load_rankgpt(data_json: str | Path, qrels_path: str | Path | None = None, name: str | None = None) -> EvalSet:
    """The RankGPT / rank_llm shape: [{"query": text or {"text", "qid"}, "hits": [{"qid", "docid", "content"}]}],
    plus TREC qrels (required: without judgements every metric would be undefined)."""
    p = Path(data_json)
    if qrels_path is None:
        raise ValueError(f"{p}: RankGPT-style data needs its qrels (--qrels FILE, TREC format)")
    qrels = read_qrels(qrels_path)
    items = json.loads(p.read_text())
    corpus, queries, run, skipped = {}, {}, {}, Counter()
    for i, it in enumerate(items):
        hits = it.get("hits") or []
        text, qid = query_text(it, f"{p} item {i}")
        if not hits:
            skipped["empty_candidate_list"] += 1
            continue
        q = qid or str(hits[0]["qid"])
        queries[q] = text
        run[q] = []
        for h in hits:
            corpus[str(h["docid"])] = h["content"]
            run[q].append(str(h["docid"]))
    for q in list(run):
        if q not in qrels:
            skipped["query_without_qrels"] += 1
            del run[q]
    if not run:
        raise ValueError(f"{p}: no query has a judgement in {qrels_path} (query ids differ?)")
    return EvalSet(name or p.parent.name, corpus, queries, {q: qrels[q] for q in run}, run, skipped)


def load_eval_set(
    data: str | Path,
    *,
    qrels: str | Path | None = None,
    split: str = "test",
    run: str | Path | None = None,
    max_queries: int = 0,
    top_k: int = 100,
) -> EvalSet:
    """A BEIR folder (with a first-stage TREC `run`) or a RankGPT / rank_llm `data.json` (with TREC `qrels`).
    max_queries > 0 keeps the first N query ids in sorted order: the same subset every time it is asked for."""
    data = Path(data)
    es = load_rankgpt(data, qrels) if data.suffix == ".json" else load_beir(data, split, run, top_k=top_k)
    if max_queries:
        keep = sorted(es.run)[:max_queries]
        es.run = {q: es.run[q] for q in keep}
        es.qrels = {q: es.qrels[q] for q in keep}
    return es
