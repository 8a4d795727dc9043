# Seed 1 of the CPU decoder proof's stage 2 (2026-12-05, 2-core AMD EPYC with AVX512-BF16, bf16, 2 gloo ranks, ZeRO-2,
# gradient checkpointing), from the seed-1 stage-1 export (run.sh in this folder).
# Seed 0's stage-2 settings, chosen on dev (../scifact-proof-cpu-2026-11-29): qrels-grades teacher, 16-candidate
# slates, lr 1e-4, tau 0.05, 8 queries a step, 40 steps; here under one schedule (10-step warm-up, then linear decay,
# trainer/schedule.py) where seed 0 ran 20 + 20 steps with a restart. No dev evaluation (nothing is chosen again).
# Then SciFact test (both modes) and NovelEval (both modes) for the stage-2 export.
# Run from the repository root after `. .venv/bin/activate && . scripts/env.sh` (torchrun listens on 127.0.0.1).
set -euo pipefail
O=runs/cpuproof
S1=$O/train/stage1-lr0.0002-t0.05-seed1
S2=$O/train/stage2-grades-lr0.0001-t0.05-seed1
T=$O/test-seed1
SCI=${E2RANK_SCIFACT:-../shared/data/scifact} N=${E2RANK_NOVELEVAL:-../shared/data/noveleval}
[ -f $S2/export/e2rank.json ] || python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer \
  stage=2 shards=$O/shards-grades model.path=$S1/export run.output_dir=$S2 \
  run.max_steps=40 run.save_every=10 run.global_batch_size=8 optim.lr=0.0001 optim.warmup_steps=10 \
  model.pooling=last model.dtype=auto model.gradient_checkpointing=true run.seed=1 loader.seed=1 run.log_every=1 \
  loss.temperature=0.05 loader.negatives_per_query=3 deepspeed.zero_stage=2 encode.chunk_tokens=16384 \
  encode.min_chunk_efficiency=0.95 tracking.experiment=e2rank-scifact-proof tracking.run_name=stage2-grades-lr0.0001-t0.05-seed1 \
  "tracking.tracking_uri=sqlite:///$PWD/$O/mlflow.db"
mkdir -p $T/noveleval
run() { log=$1; shift; [ -f $T/$log.log ] && return; echo "=== $log $(date -u +%T)"
        OMP_NUM_THREADS=2 python -m trainer.evaluate "$@" > $T/$log.log.tmp && mv $T/$log.log.tmp $T/$log.log
        echo "=== $log done $(date -u +%T)"; }
run stage2 --model $S2/export --data $SCI --run $SCI/runs/bm25.top100.test.trec --split test \
  --modes retrieval listwise --out $T --tag stage2
run novel-stage2 --model $S2/export --data $N/data.json --qrels $N/qrels.txt --out $T/noveleval --tag stage2
