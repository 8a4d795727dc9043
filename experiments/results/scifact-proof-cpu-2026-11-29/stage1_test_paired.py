# Paired tests of the CPU stage-1 export against the stage-2 exports on SciFact test (2026-11-29). Run from the
# repository root after `. .venv/bin/activate`; reads the run files under runs/ that trainer.evaluate wrote.
import json
from pathlib import Path

from evaluation.metrics import paired_test, per_query_of_run
from evaluation.readers import load_beir

qrels = load_beir("../shared/data/scifact", "test", "../shared/data/scifact/runs/bm25.top100.test.trec").qrels
runs = {
    "stage-1 retrieval": (Path("runs/s11/stage1-test"), "stage1", "retrieval"),
    "20-step stage-2 retrieval": (Path("runs/cpuproof/prompt-size"), "k20", "retrieval"),
    "20-step stage-2 listwise": (Path("runs/cpuproof/prompt-size"), "k20", "listwise"),
    "40-step stage-2 retrieval": (Path("runs/s10/more20-test"), "more20", "retrieval"),
    "40-step stage-2 listwise": (Path("runs/s10/more20-test"), "more20", "listwise"),
    "BM25": (Path("runs/s10/more20-test"), "more20", "first_stage"),
}
pq = {k: per_query_of_run(qrels, d, "scifact", t, m) for k, (d, t, m) in runs.items()}
out = {}
for b, a in [("40-step stage-2 listwise", "stage-1 retrieval"), ("20-step stage-2 listwise", "stage-1 retrieval"),
             ("40-step stage-2 retrieval", "stage-1 retrieval"), ("stage-1 retrieval", "BM25")]:
    r = paired_test(pq[a], pq[b])
    out[f"{b} vs {a}"] = r
    print(
        f"{b} vs {a}: {r['mean_a']:.4f} -> {r['mean_b']:.4f}, {r['diff']:+.4f} "
        f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}], p = {r['p_ttest']:.2g} (n={r['queries']})"
    )
Path("experiments/results/scifact-proof-cpu-2026-11-29/stage1-test-paired.json").write_text(
    json.dumps(out, indent=1) + "\n"
)
