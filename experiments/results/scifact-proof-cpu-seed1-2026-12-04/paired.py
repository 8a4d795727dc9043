# Paired tests for the seed-1 stage-1 export (2026-12-04): SciFact test (300 queries) against BM25 and the base
# SmolLM2-135M, NovelEval (21 queries) against the base, from the run files run.sh / evals.sh had trainer.evaluate
# write under runs/cpuproof/test-seed1. Run from the repository root after `. .venv/bin/activate`.
import json
from pathlib import Path

from trainer.evaluation import load_beir, load_eval_set, paired_test, per_query_of_run, run_file

T = Path("runs/cpuproof/test-seed1")
sci = Path("../shared/data/scifact")
nov = Path("../shared/data/noveleval")
sets = {"scifact": (load_beir(sci, "test", sci / "runs/bm25.top100.test.trec").qrels, T),
        "noveleval": (load_eval_set(nov / "data.json", qrels=nov / "qrels.txt").qrels, T / "noveleval")}
comparisons = [("scifact", ("stage1", "retrieval"), ("stage1", "first_stage")),
               ("scifact", ("stage1", "retrieval"), ("base", "retrieval")),
               ("noveleval", ("stage1", "retrieval"), ("stage1", "first_stage")),
               ("noveleval", ("stage1", "retrieval"), ("base", "retrieval")),
               ("noveleval", ("stage1", "listwise"), ("base", "listwise"))]


def label(model_mode):
    return "BM25" if model_mode[1] == "first_stage" else " ".join(model_mode)


out = {}
for name, b, a in comparisons:
    qrels, d = sets[name]
    runs = [run_file(d, name, t, m) for t, m in (a, b)]
    if not all(r.exists() for r in runs):
        print(f"{name}: {b} vs {a}: not scored (missing {[str(r) for r in runs if not r.exists()]})")
        continue
    r = paired_test(per_query_of_run(qrels, d, name, *a), per_query_of_run(qrels, d, name, *b))
    out[f"{name}: {label(b)} vs {label(a)}"] = r
    print(f"{name}: {label(b)} vs {label(a)}: {r['mean_a']:.4f} -> {r['mean_b']:.4f}, {r['diff']:+.4f} "
          f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}], p = {r['p_ttest']:.2g} (n={r['queries']})")
Path(__file__).with_name("paired.json").write_text(json.dumps(out, indent=1) + "\n")
