"""Metrics with trec_eval semantics (pytrec_eval): NDCG@10, MRR@10, Recall@100, per-query values, and the paired
test every comparison between models or modes reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .readers import read_trec_run

METRICS = {"ndcg_cut_10": "NDCG@10", "recip_rank": "MRR@10", "recall_100": "Recall@100"}


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
    return per_query(
        qrels, {q: dict(docs) for q, docs in read_trec_run(run_file(out_dir, set_name, tag, mode)).items()}
    )


def paired_test(a: dict[str, float], b: dict[str, float], n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """b against a on the queries both scored: mean difference, two-sided paired t-test p-value, and a 95% paired
    bootstrap interval of the mean difference (queries resampled with replacement)."""
    from scipy.stats import ttest_rel

    qs = sorted(set(a) & set(b))
    x, y = np.array([a[q] for q in qs]), np.array([b[q] for q in qs])
    diff = y - x
    boot = np.random.default_rng(seed).choice(diff, (n_boot, len(diff)), replace=True).mean(1)
    p = float(ttest_rel(y, x).pvalue) if np.any(diff != 0) else 1.0
    return {
        "queries": len(qs),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "diff": float(diff.mean()),
        "p_ttest": p,
        "ci95_low": float(np.quantile(boot, 0.025)),
        "ci95_high": float(np.quantile(boot, 0.975)),
    }
