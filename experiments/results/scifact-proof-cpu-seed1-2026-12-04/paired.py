# Paired tests for seed 1 (stage 1: 2026-12-04, run.sh; stage 2: 2026-12-05, stage2.sh): SciFact test (300 queries)
# and NovelEval (21 queries), from the run files run.sh, evals.sh and stage2.sh had trainer.evaluate write under
# runs/cpuproof/test-seed1. Writes paired.json and per_query.json here (experiments/paired_report.py); the tables of
# the README then come from per_query.json alone: python -m experiments.proof_tables <this folder>.
# Run from the repository root after `. .venv/bin/activate`: PYTHONPATH=. python <this file>.
from pathlib import Path

from evaluation.readers import load_beir, load_eval_set
from experiments.paired_report import report

T = Path("runs/cpuproof/test-seed1")
sci = Path("../shared/data/scifact")
nov = Path("../shared/data/noveleval")
sets = {"scifact": (load_beir(sci, "test", sci / "runs/bm25.top100.test.trec").qrels, T),
        "noveleval": (load_eval_set(nov / "data.json", qrels=nov / "qrels.txt").qrels, T / "noveleval")}
S1R, S2R, S2L = ("stage1", "retrieval"), ("stage2", "retrieval"), ("stage2", "listwise")
comparisons = [("scifact", S1R, ("stage1", "first_stage")),
               ("scifact", S1R, ("base", "retrieval")),
               ("scifact", S2L, S1R),  # issue 9's targets: stage-2 listwise > stage-1 retrieval > base retrieval
               ("scifact", S2L, S2R),
               ("scifact", S2R, S1R),
               ("scifact", S2L, ("stage2", "first_stage")),
               ("noveleval", S1R, ("stage1", "first_stage")),
               ("noveleval", S1R, ("base", "retrieval")),
               ("noveleval", ("stage1", "listwise"), ("base", "listwise")),
               ("noveleval", S2L, ("base", "listwise")),  # issue 9's NovelEval target
               ("noveleval", S2R, ("base", "retrieval")),
               ("noveleval", S2L, S2R),
               ("noveleval", S2L, ("stage2", "first_stage"))]
report(sets, comparisons, Path(__file__).parent, seed=1)  # per_query.json keyed by seed
