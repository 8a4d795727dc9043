# The CPU replicate of the decoder proof (2026-11-29, 2-core AMD EPYC with AVX512-BF16, bf16, 2 gloo ranks, ZeRO-2).
# Seed 0 of the settings the H200 run chose on dev (stage 1 lr 2e-4 / tau 0.05, stage 2 lr 1e-4, qrels-grades
# teacher), 20 + 20 steps, dev NDCG@10 at the end of each stage; then the prompt-size ablation scores SciFact test.
# Run from the repository root after `. .venv/bin/activate && . scripts/env.sh` (torchrun listens on 127.0.0.1).
set -e
python -m experiments.scifact_proof prepare --out runs/cpuproof                       # ~3 min
python -m experiments.scifact_proof run --out runs/cpuproof --seeds 0 --nproc 2 --zero-stage 2 --grad-ckpt true \
  --stage1-grid 2e-4:0.05 --stage1-steps 20 --eval-every 20 \
  --teacher grades --compare-teachers --stage2-lrs 1e-4 --stage2-steps 20 --stage2-eval-every 20 \
  --test-models --jobs 1                                                              # ~110 min
OMP_NUM_THREADS=2 python -m experiments.prompt_size --out runs/cpuproof/prompt-size \
  --model runs/cpuproof/train/stage2-grades-lr0.0001-t0.05-seed0/export --dev runs/cpuproof/scifact-dev

# 2026-11-29 ablation: stage-2 slates in first-stage order (the BM25 top 16 in BM25 order, as the test
# prompt holds its top 20) instead of shuffled with the relevant documents forced in; same stage-1 export, same seed
# and schedule. `prepare` builds the extra slates and their unshuffled shards (about 20 s).
python -m experiments.scifact_proof prepare --out runs/cpuproof
python -m experiments.scifact_proof run --out runs/cpuproof --seeds 0 --nproc 2 --zero-stage 2 --grad-ckpt true \
  --stage1-grid 2e-4:0.05 --stage1-steps 20 --eval-every 20 \
  --teacher grades-first-stage --compare-teachers --stage2-lrs 1e-4 --stage2-steps 20 --stage2-eval-every 20 \
  --test-models --jobs 1                                                              # ~55 min
# and 20 more stage-2 steps from the 20-step export (more20.sh)
bash experiments/results/scifact-proof-cpu-2026-11-29/more20.sh
