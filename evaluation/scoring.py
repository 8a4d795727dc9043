"""Reranking evaluation with BEIR / TREC conventions, in two scoring modes over the same first-stage candidates:

- retrieval: cos(query embedding, document embedding);
- listwise (E2Rank): the prompt built from the top-`prompt_k` first-stage candidates (the training prompt builder),
  every candidate of the top-`top_k` scored by cos(prompt embedding, document embedding).

Metrics come from pytrec_eval (trec_eval semantics): NDCG@10, MRR@10, Recall@100. Skipped inputs (queries without
qrels or candidates, run entries naming unknown documents) are counted in the summary, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import metrics, relevance_threshold, run_file
from .readers import EvalSet, write_trec_run


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
