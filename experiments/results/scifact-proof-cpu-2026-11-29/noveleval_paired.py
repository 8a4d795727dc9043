# Paired tests on NovelEval (21 queries) of the CPU models (2026-11-29). Run from the repository root after
# `. .venv/bin/activate`; reads the run files trainer.evaluate wrote under runs/s11/noveleval.
import json
from pathlib import Path

from evaluation.metrics import paired_test, per_query_of_run
from evaluation.readers import load_eval_set

N = Path("../shared/data/noveleval")
qrels = load_eval_set(N / "data.json", qrels=N / "qrels.txt").qrels
d = Path("runs/s11/noveleval")
tags = [t for t in ("base", "stage1", "s2k20", "more20") if (d / f"noveleval.{t}.json").exists()]
pq = {(t, m): per_query_of_run(qrels, d, "noveleval", t, m) for t in tags for m in ("retrieval", "listwise")}
pq[("bm25", "first_stage")] = per_query_of_run(qrels, d, "noveleval", tags[0], "first_stage")
out = {}
for (b, a) in [(("more20", "listwise"), ("base", "listwise")), (("more20", "listwise"), ("stage1", "retrieval")),
               (("more20", "listwise"), ("more20", "retrieval")), (("more20", "listwise"), ("bm25", "first_stage")),
               (("stage1", "retrieval"), ("base", "retrieval")), (("s2k20", "listwise"), ("base", "listwise"))]:
    if a in pq and b in pq:
        r = paired_test(pq[a], pq[b])
        out[f"{' '.join(b)} vs {' '.join(a)}"] = r
        print(f"{' '.join(b)} vs {' '.join(a)}: {r['mean_a']:.4f} -> {r['mean_b']:.4f}, {r['diff']:+.4f} "
              f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}], p = {r['p_ttest']:.2g} (n={r['queries']})")
Path("experiments/results/scifact-proof-cpu-2026-11-29/noveleval-paired.json").write_text(
    json.dumps(out, indent=1) + "\n"
)
