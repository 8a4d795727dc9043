#!/usr/bin/env bash
# NovelEval (21 queries, 20 candidates each) for the base model and the CPU exports (2026-11-29), one at a time:
# more20 = 20 + 20 stage-2 steps, s2k20 = the 20-step stage-2 export. Run from the repository root.
cd /work/main; . .venv/bin/activate; . scripts/env.sh; export OMP_NUM_THREADS=1
N=../shared/data/noveleval
ev() { echo "=== $1 $(date -u +%H:%M:%S)"; python -m trainer.evaluate "${@:2}" --data $N/data.json --qrels $N/qrels.txt --out runs/s11/noveleval --tag $1 > /tmp/s11/novel-$1.log 2>&1; echo "=== $1 rc=$? $(date -u +%H:%M:%S)"; }
ev more20 --model runs/cpuproof/train/stage2-grades-lr0.0001-t0.05-seed0-more20/export
ev base --model /root/.cache/e2rank/models/smollm2-135m --base --pooling last
ev stage1 --model runs/cpuproof/train/stage1-lr0.0002-t0.05-seed0/export
ev s2k20 --model runs/cpuproof/train/stage2-grades-lr0.0001-t0.05-seed0/export
