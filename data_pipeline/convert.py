"""Converters from peers' data into our listwise format (E2Rank's {query, document, ranking, source})."""

from __future__ import annotations

import json
from pathlib import Path


def flagembedding_to_listwise(src: str | Path, dst: str | Path, *, slate: int = 16, source: str | None = None) -> int:
    """FlagEmbedding {query,pos,neg,pos_scores,neg_scores}: the slate is the positives plus the top-scored
    negatives, and the teacher ordering is by score (a reranker's), best first. Returns records written."""
    n = 0
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            r = json.loads(line)
            cands = list(zip(r["pos"], r["pos_scores"])) + sorted(zip(r["neg"], r["neg_scores"]), key=lambda x: -x[1])
            cands = list(dict(cands[:slate]).items())  # drop duplicate texts, keep the first score
            if len(cands) < 2:
                continue
            docs = [c[0] for c in cands]
            order = sorted(range(len(cands)), key=lambda i: (-cands[i][1], i))
            rec = {"query": r["query"], "document": docs, "ranking": [i + 1 for i in order]}
            if source:
                rec["source"] = source
            out.write(json.dumps(rec) + "\n")
            n += 1
    return n
