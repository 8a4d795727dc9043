# Environment for every process we start on a CPU machine (thread counts and allocator settings that 2-core CPU runs need). Sourced, not run.
# RAY_AUTH_MODE=token: every Ray we start requires a token (common/ray_auth.py gives each its own).
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning} \
  MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SKIP_DS_SHM_OP=1 TOKENIZERS_PARALLELISM=false
# Real data beside the project (never copied into it); tests that need it skip when it is absent.
export E2RANK_SHARED_DATA=${E2RANK_SHARED_DATA:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/data}
