"""The held-out sets every experiment reports on, read from the shared data folder (E2RANK_SHARED_DATA)."""

from __future__ import annotations

from pathlib import Path

from evaluation.readers import EvalSet, load_eval_set


def real_sets(data: str | Path, max_queries: int = 0) -> dict[str, EvalSet]:
    """SciFact test (300 queries, BM25 top-100 from the data's runs/) and NovelEval (21 queries, RankGPT shape)."""
    d = Path(data)
    return {"scifact": load_eval_set(d / "scifact", split="test", run=d / "scifact" / "runs" / "bm25.top100.test.trec",
                                     max_queries=max_queries),
            "noveleval": load_eval_set(d / "noveleval" / "data.json", qrels=d / "noveleval" / "qrels.txt",
                                       max_queries=max_queries)}
