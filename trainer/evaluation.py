"""Reranking evaluation with BEIR / TREC conventions, in two scoring modes over the same first-stage candidates:

- retrieval: cos(query embedding, document embedding);
- listwise (E2Rank): the prompt built from the top-`prompt_k` first-stage candidates (the training prompt builder),
  every candidate of the top-`top_k` scored by cos(prompt embedding, document embedding).

Metrics come from pytrec_eval (trec_eval semantics): NDCG@10, MRR@10, Recall@100. Skipped inputs (queries without
qrels or candidates, run entries naming unknown documents) are counted in the summary, never silently dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.beir import load_corpus, load_qrels, load_queries

METRICS = {"ndcg_cut_10": "NDCG@10", "recip_rank": "MRR@10", "recall_100": "Recall@100"}


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
                raise ValueError(f"{path}:{n}: a TREC run line has 6 fields (qid Q0 docid rank score tag), got {len(parts)}")
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


def _query_text(item: dict, where: str) -> tuple[str, str | None]:
    """RankGPT's "query": "text", or rank_llm's "query": {"text", "qid"} -> (text, qid or None)."""
    q = item.get("query")
    if isinstance(q, str):
        return q, None
    if isinstance(q, dict) and isinstance(q.get("text"), str):
        return q["text"], None if q.get("qid") is None else str(q["qid"])
    raise ValueError(f"{where}: 'query' must be a string or {{\"text\": ..., \"qid\": ...}} (rank_llm), got "
                     f"{type(q).__name__}")


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
        text, qid = _query_text(it, f"{p} item {i}")
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


def load_eval_set(data: str | Path, *, qrels: str | Path | None = None, split: str = "test",
                  run: str | Path | None = None, max_queries: int = 0, top_k: int = 100) -> EvalSet:
    """A BEIR folder (with a first-stage TREC `run`) or a RankGPT / rank_llm `data.json` (with TREC `qrels`).
    max_queries > 0 keeps the first N query ids in sorted order: the same subset every time it is asked for."""
    data = Path(data)
    es = load_rankgpt(data, qrels) if data.suffix == ".json" else load_beir(data, split, run, top_k=top_k)
    if max_queries:
        keep = sorted(es.run)[:max_queries]
        es.run = {q: es.run[q] for q in keep}
        es.qrels = {q: es.qrels[q] for q in keep}
    return es


def relevance_threshold(qrels: dict[str, dict[str, int]]) -> tuple[int, str]:
    """The grade from which a document counts as relevant for the binary metrics (MRR@10, Recall@100; trec_eval's
    -l): 2 on TREC Deep Learning's 0-3 scale, as TREC DL and Pyserini report them; 1 elsewhere, as BEIR does."""
    top = max((g for q in qrels.values() for g in q.values()), default=1)
    if top >= 3:
        return 2, "graded qrels on a 0-3 scale: TREC Deep Learning convention (trec_eval -l 2)"
    return 1, "any positive grade (BEIR convention, trec_eval -l 1)"


def metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], level: int = 1) -> dict[str, float]:
    """NDCG@10 on the grades; MRR@10 and Recall@100 count grades >= `level` as relevant."""
    import pytrec_eval

    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    binary = pytrec_eval.RelevanceEvaluator(qrels, {"recall.100"}, relevance_level=level)
    top10 = {q: dict(sorted(s.items(), key=lambda x: (-x[1], x[0]))[:10]) for q, s in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=level).evaluate(top10)  # beyond 10: 0
    per, rec = ev.evaluate(run), binary.evaluate(run)
    out = {"NDCG@10": float(np.mean([v["ndcg_cut_10"] for v in per.values()])),
           "Recall@100": float(np.mean([v["recall_100"] for v in rec.values()])),
           "MRR@10": float(np.mean([v["recip_rank"] for v in rr.values()]))}
    return {k: round(v, 4) for k, v in out.items()}


def per_query(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measure: str = "ndcg_cut_10"
              ) -> dict[str, float]:
    """One value per judged query (trec_eval semantics), for paired tests."""
    import pytrec_eval

    name, _, k = measure.rpartition("_")
    base = f"{name}.{k}" if k.isdigit() else measure
    res = pytrec_eval.RelevanceEvaluator(qrels, {base}).evaluate(run)
    return {q: v[measure] for q, v in res.items()}


def run_file(out_dir: Path, set_name: str, tag: str, mode: str) -> Path:
    """Where evaluate() writes one model's ranking in one mode (TREC run format)."""
    return Path(out_dir) / f"{set_name}.{tag}.{mode}.trec"


def per_query_of_run(qrels: dict[str, dict[str, int]], out_dir: Path, set_name: str, tag: str, mode: str
                     ) -> dict[str, float]:
    """Per-query NDCG@10 of a run evaluate() wrote: the input of paired tests between models and modes."""
    return per_query(qrels, {q: dict(docs) for q, docs in read_trec_run(run_file(out_dir, set_name, tag, mode)).items()})


def paired_test(a: dict[str, float], b: dict[str, float], n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """b against a on the queries both scored: mean difference, two-sided paired t-test p-value, and a 95% paired
    bootstrap interval of the mean difference (queries resampled with replacement)."""
    from scipy.stats import ttest_rel

    qs = sorted(set(a) & set(b))
    x, y = np.array([a[q] for q in qs]), np.array([b[q] for q in qs])
    diff = y - x
    boot = np.random.default_rng(seed).choice(diff, (n_boot, len(diff)), replace=True).mean(1)
    p = float(ttest_rel(y, x).pvalue) if np.any(diff != 0) else 1.0
    return {"queries": len(qs), "mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": float(diff.mean()),
            "p_ttest": p, "ci95_low": float(np.quantile(boot, 0.025)), "ci95_high": float(np.quantile(boot, 0.975))}


def first_stage_scores(es: EvalSet) -> dict[str, dict[str, float]]:
    return {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in es.run.items()}


def evaluate(reranker, es: EvalSet, *, query_instruction: str = "", rerank_instruction: str = "",
             modes=("retrieval", "listwise"), prompt_k: int = 20, out_dir: Path | None = None, tag: str = "model",
             progress: bool = True, level: int | None = None) -> dict:
    """Score es.run's candidates in each mode; returns {"first_stage": metrics, mode: metrics, "skipped": {...},
    "relevance_threshold": {...}}. Mode "first_stage" alone needs no model (reranker may be None). `level`: the
    grade from which MRR@10 / Recall@100 count a document relevant (None: relevance_threshold's convention)."""
    from tqdm import tqdm

    qids = sorted(es.run)
    rule = "set by the caller"
    if level is None:
        level, rule = relevance_threshold(es.qrels)
    result = {"set": es.name, "queries": len(qids), "skipped": dict(es.skipped),
              "relevance_threshold": {"grade": level, "applies_to": ["MRR@10", "Recall@100"], "rule": rule}}

    def done(mode: str, run: dict[str, dict[str, float]]) -> None:
        # each mode's run file and metrics are written as soon as they exist: a later mode failing loses nothing
        result[mode] = metrics(es.qrels, run, level)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_trec_run(run_file(out_dir, es.name, tag, mode), run, f"{tag}-{mode}")
            (out_dir / f"{es.name}.{tag}.json").write_text(json.dumps(result, indent=1))

    done("first_stage", first_stage_scores(es))
    model_modes = [m for m in modes if m != "first_stage"]
    if not model_modes:
        return result
    # progress in tokens, not items: the longest sequences go first, so a per-item rate would promise too much
    bar = lambda what: tqdm(desc=f"[eval {es.name}] {what}", unit="tok", unit_scale=True,  # noqa: E731
                            disable=not progress)
    needed = {d: es.corpus[d] for q in qids for d in es.run[q]}
    with bar(f"{len(needed)} documents") as b:
        demb = reranker.embed_documents(needed, progress=b)
    if "retrieval" in model_modes:
        with bar(f"{len(qids)} queries") as b:
            qe = reranker.embed_queries([es.queries[q] for q in qids], query_instruction, progress=b)
        done("retrieval", {q: {d: float(demb[d] @ qe[i]) for d in es.run[q]} for i, q in enumerate(qids)})
    if "listwise" in model_modes:
        slates = [[es.corpus[d] for d in es.run[q][:prompt_k]] for q in qids]
        with bar(f"{len(qids)} listwise prompts") as b:
            pe = reranker.embed_prompts([es.queries[q] for q in qids], slates, rerank_instruction, progress=b)
        done("listwise", {q: {d: float(demb[d] @ pe[i]) for d in es.run[q]} for i, q in enumerate(qids)})
    return result
