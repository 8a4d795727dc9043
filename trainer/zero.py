"""The DeepSpeed configuration, with ZeRO sized to the model.

ZeRO-3 partitions parameters so that models larger than one device train at all; when the weights fit, gathering
every module for every forward (and every checkpoint recompute) only costs time: DeepSpeed's maintainers say as
much (deepspeedai/DeepSpeed#1436). So `stage3_param_persistence_threshold=-1` (auto) keeps every tensor whole on
every rank when the weights take at most PERSIST_FRACTION of a rank's memory: gradients and optimizer states stay
partitioned, the updated weights are all-gathered once per optimizer step. Otherwise DeepSpeed's default (1e5
elements) applies and large tensors are gathered per forward as usual.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .config import TrainConfig

log = logging.getLogger(__name__)

PERSIST_FRACTION = 0.25  # weights under a quarter of a rank's memory leave room for states and activations
DS_DEFAULT_PERSISTENCE = 100_000
GPU_BUCKET = 500_000_000  # DeepSpeed's default reduce bucket (elements)
# CPU: gloo pays a fixed cost per call, so a 135M model in hidden^2 (332k-element) buckets made ~400 reductions per
# backward; 2.5e7 elements (100 MB fp32, as DDP's 25 MB buckets scaled to fp32 flat buffers) makes a handful
CPU_BUCKET = 25_000_000


@dataclass(frozen=True)
class ZeroPlan:
    stage: int
    persistence_threshold: int
    reduce_bucket_size: int
    reason: str


def plan(cfg: TrainConfig, *, n_params: int, largest: int, bytes_per: int, rank_bytes: float, cuda: bool,
         resumed_stage: int | None = None) -> ZeroPlan:
    """The ZeRO stage and sizes this run uses and why (derived values; the config itself is not changed).
    `zero_stage: auto` is ZeRO-2 when the weights fit a rank (weights whole, gradients and optimizer states
    partitioned, no per-module hooks: a SmolLM2-135M CPU step took 15.3 s against 18.8 s for ZeRO-3 with every tensor
    persistent, bench/README.md), else ZeRO-3. On CPUs, when all model states fit (weights, gradients, fp32 master
    weights and Adam moments: ~16 bytes a parameter) it is ZeRO-0, plain data parallelism: no partitioned optimizer
    step, whose copies and bookkeeping cost a SmolLM2-135M bf16 step ~0.8 s (bench/README.md). A resumed run keeps the
    stage its checkpoint was written with."""
    ds = cfg.deepspeed
    bucket = ds.reduce_bucket_size or (GPU_BUCKET if cuda else CPU_BUCKET)
    weights = n_params * bytes_per
    fits = weights <= PERSIST_FRACTION * rank_bytes
    states = n_params * (bytes_per + 12)  # + fp32 gradients or master weights, Adam's two moments
    states_fit = not cuda and states <= PERSIST_FRACTION * rank_bytes
    size = (
        f"the weights ({weights / 2**30:.2f} GB) {'fit' if fits else 'do not fit'} a rank ({rank_bytes / 2**30:.1f} GB)"
    )
    stage, why = ds.zero_stage, "deepspeed.zero_stage set"
    if stage == "auto":
        if resumed_stage is not None:
            stage, why = resumed_stage, "zero_stage auto: the stage the checkpoint was written with"
        else:
            stage, why = (2, f"zero_stage auto: {size}") if fits else (3, f"zero_stage auto: {size}")
            if states_fit:
                stage, why = 0, f"zero_stage auto: on a CPU the model states ({states / 2**30:.2f} GB) fit a rank"
    if stage != 3:
        return ZeroPlan(
            stage,
            ds.stage3_param_persistence_threshold,
            bucket,
            f"ZeRO-{stage} ({why}): weights are whole on every rank",
        )
    if ds.stage3_param_persistence_threshold >= 0:
        return ZeroPlan(
            3,
            ds.stage3_param_persistence_threshold,
            bucket,
            f"ZeRO-3 ({why}); deepspeed.stage3_param_persistence_threshold set",
        )
    if fits:
        return ZeroPlan(
            3,
            largest + 1,
            bucket,
            f"ZeRO-3 ({why}); {size}: every tensor persists, no gathers per "
            "forward; gradients and optimizer states stay partitioned",
        )
    return ZeroPlan(
        3,
        DS_DEFAULT_PERSISTENCE,
        bucket,
        f"ZeRO-3 ({why}); {size} (over {PERSIST_FRACTION:.0%} of it): "
        "partitioned, gathered per module (tensors < 1e5 elements persist)",
    )


def ds_config(
    cfg: TrainConfig,
    bf16: bool,
    hidden: int,
    cuda: bool = False,
    universal: bool = False,
    zero: ZeroPlan | None = None,
    micro_batch: int | None = None,
    autocast: bool = False,
) -> dict[str, Any]:
    """DeepSpeed's JSON config for this run. Without a `zero` plan (tests, reference files) the sizes are the
    configured values, with auto persistence resolved to DeepSpeed's default. `micro_batch`: the per-rank batch the
    trainer derived (run.global_batch_size, a resume on another world size); default loader.batch_size."""
    ds = cfg.deepspeed
    if zero is None:  # without a model to size: auto is ZeRO-3, auto persistence DeepSpeed's default
        t = ds.stage3_param_persistence_threshold
        zero = ZeroPlan(
            3 if ds.zero_stage == "auto" else ds.zero_stage,
            t if t >= 0 else DS_DEFAULT_PERSISTENCE,
            ds.reduce_bucket_size or (GPU_BUCKET if cuda else CPU_BUCKET),
            "",
        )
    z: dict[str, Any] = {"stage": zero.stage}
    if zero.stage >= 2:
        z["reduce_bucket_size"] = zero.reduce_bucket_size
        z["overlap_comm"] = cuda  # a side stream: nothing to overlap with on CPU
        z["contiguous_gradients"] = True
    if zero.stage == 3:
        z["stage3_param_persistence_threshold"] = zero.persistence_threshold
        if not cuda:
            z["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    if ds.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu"}
    master = master_weights(cfg, zero.stage, bf16)
    out = {
        "train_micro_batch_size_per_gpu": micro_batch or cfg.loader.batch_size,
        "gradient_accumulation_steps": cfg.loader.grad_accum,
        # MasterAdamW clips its fp32 gradient itself and keeps the bf16 weights' masters (DeepSpeed sees plain weights)
        "gradient_clipping": 0.0 if master else cfg.optim.grad_clip,
        "zero_optimization": z,
        "bf16": {"enabled": bf16 and not master},
        # fp32 weights and optimizer, the forward under torch.autocast (its Linear gradients reduced in bf16)
        **({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if autocast else {}),
        # no "scheduler": trainer/schedule.py owns it (passed to deepspeed.initialize)
        "steps_per_print": 10**9,
        # resuming a checkpoint written by another number of ranks (checkpoint.to_universal)
        **({"checkpoint": {"load_universal": True}} if universal else {}),
        **({"communication_data_type": ds.communication_dtype} if ds.communication_dtype and not master else {}),
    }
    if not client_optimizer(cfg):
        out["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "weight_decay": cfg.optim.weight_decay,
                "torch_adam": True,
            },
        }
    return out


def client_optimizer(cfg: TrainConfig) -> bool:
    """Fused AdamW is passed to DeepSpeed as a client optimizer (its torch_adam path passes only `foreach`);
    optimizer offload keeps DeepSpeed's CPU Adam."""
    return cfg.optim.fused and not cfg.deepspeed.offload_optimizer


def master_weights(cfg: TrainConfig, stage: int, bf16: bool) -> bool:
    """bf16 weights under ZeRO-0 train through MasterAdamW (fp32 masters, one flat all-reduce:
    trainer/master_weights.py) instead of DeepSpeed's BF16_Optimizer, whose per-parameter fp32 accumulation and fp32
    all-reduce made ZeRO-0 no faster than ZeRO-2 on a CPU (bench/README.md)."""
    return stage == 0 and bf16 and client_optimizer(cfg)


def make_optimizer(cfg: TrainConfig, params, master: bool = False):
    import torch

    o = cfg.optim
    if master:
        from .master_weights import MasterAdamW

        comm = {"": None, "fp32": torch.float32, "bf16": torch.bfloat16}[cfg.deepspeed.communication_dtype]
        return MasterAdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, max_norm=o.grad_clip,
                           comm_dtype=comm)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)


def reduce_once(engine, backwards: int):
    """A context around one optimizer step's backwards: with several (GradCache chunks, accumulated micro-batches)
    under ZeRO 1-3, gradients stay local and are reduced once when it exits (DeepSpeed's coalesce_grad_reduction,
    deepspeedai/DeepSpeed#7992), instead of one full reduce-scatter per backward. Elsewhere (one backward, ZeRO-0,
    DeepSpeed's bf16 optimizer wrapper) it changes nothing."""
    stage = engine.zero_optimization_stage()
    if (
        backwards < 2
        or stage == 0
        or not hasattr(engine, "coalesce_grad_reduction")
        or not hasattr(engine.optimizer, "_coalesce_grad_reduction")
    ):
        return contextlib.nullcontext()
    return engine.coalesce_grad_reduction()
