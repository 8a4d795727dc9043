# Stage 2 continued on the CPU box (2026-11-29): 20 more steps from the 20-step stage-2 export, a new
# 5-step warm-up and linear decay at the same peak LR, data order seed 1 (seed 0 would replay the first 20 steps'
# slates first), dev NDCG@10 every 10 steps. Run from the repository root after `. .venv/bin/activate && . scripts/env.sh`.
S2=runs/cpuproof/train/stage2-grades-lr0.0001-t0.05-seed0
python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer stage=2 shards=runs/cpuproof/shards-grades \
  model.path=$S2/export run.output_dir=$S2-more20 model.pooling=last model.dtype=auto model.gradient_checkpointing=true \
  run.seed=0 loader.seed=1 run.max_steps=20 run.save_every=20 run.log_every=1 run.global_batch_size=8 \
  optim.lr=0.0001 optim.warmup_steps=5 loss.temperature=0.05 loader.negatives_per_query=3 \
  eval.data=runs/cpuproof/scifact-dev eval.split=dev eval.run=runs/cpuproof/scifact-dev/runs/bm25.dev.trec \
  eval.source=scifact eval.every=10 eval.max_queries=100 deepspeed.zero_stage=2 \
  tracking.experiment=e2rank-scifact-proof tracking.run_name=stage2-grades-lr0.0001-t0.05-seed0-more20 \
  encode.chunk_tokens=16384 encode.min_chunk_efficiency=0.95 "tracking.tracking_uri=sqlite:///$PWD/runs/cpuproof/mlflow.db"
