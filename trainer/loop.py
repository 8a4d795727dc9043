"""The training loop: one readable step (batch -> embeddings -> losses -> backward -> step -> log) on a DeepSpeed
engine. Everything distributed, I/O or MLflow is one call away (distributed.py, checkpoint.py, tracking.py)."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.loader import ShardLoader
from data_pipeline.pretrained import load_tokenizer, resolve
from data_pipeline.shards import read_manifest
from data_pipeline.text import TextEncoder, TokenizationConfig
from data_pipeline.typed_config import from_dict, save, to_dict

from . import checkpoint as C
from . import distributed as D
from .config import TrainConfig
from .model import Encoder, load_backbone, resolve_precision
from .objective import compute
from .tracking import Tracker

log = logging.getLogger("e2rank")


class PreflightError(ValueError):
    """Something to fix before training can start; the message says what."""


@dataclass
class Plan:
    model_path: str
    manifest: dict[str, Any]
    fingerprint: str


def preflight(cfg: TrainConfig, world_size: int) -> Plan:
    """Checks that need no process group: model path, shards vs tokenizer, batch divisibility."""
    try:
        model_path = str(resolve(cfg.model.path, weights=True))
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(f"model.path: {e}") from e
    if not (Path(model_path) / "config.json").is_file():
        raise PreflightError(f"model.path {model_path} has no config.json: not a Hugging Face model folder")
    kind = "contrastive" if cfg.stage == 1 else "listwise"
    try:
        manifest = read_manifest(cfg.shards, kind=kind)
    except Exception as e:
        raise PreflightError(f"shards: {e}") from e
    tok_cfg = from_dict(TokenizationConfig, {**manifest["config"]["tokenization"], "tokenizer": model_path})
    fp = TextEncoder(load_tokenizer(model_path), tok_cfg).fingerprint()
    if fp != manifest["tokenizer"]["fingerprint"]:
        raise PreflightError(
            f"shards in {cfg.shards} were tokenized with {manifest['tokenizer']['name']}, not this model's tokenizer "
            f"({cfg.model.path}); re-run the pipeline with tokenization.tokenizer={cfg.model.path}"
        )
    if cfg.run.global_batch_size:
        per = world_size * cfg.loader.grad_accum
        if cfg.run.global_batch_size % per:
            raise PreflightError(
                f"run.global_batch_size={cfg.run.global_batch_size} does not divide across {world_size} ranks x "
                f"{cfg.loader.grad_accum} accumulation steps; use a multiple of {per}"
            )
        cfg.loader.batch_size = cfg.run.global_batch_size // per
    return Plan(model_path, manifest, fp)


def ds_config(cfg: TrainConfig, bf16: bool, hidden: int) -> dict[str, Any]:
    z: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage >= 2:
        # Buckets sized to the model (as HF's "auto"): DeepSpeed's 5e8-element defaults allocate GBs per rank,
        # which a 22M-parameter model on a 2-core CPU box pays for in RSS (and was OOM-killed for).
        z["reduce_bucket_size"] = hidden * hidden
    if cfg.deepspeed.zero_stage == 3:
        z["stage3_param_persistence_threshold"] = cfg.deepspeed.stage3_param_persistence_threshold
        z["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    if cfg.deepspeed.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.loader.batch_size,
        "gradient_accumulation_steps": cfg.loader.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": z,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                  "weight_decay": cfg.optim.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            # no warm-up asked: start at the full LR (DeepSpeed needs >= 1 warm-up step)
            "warmup_min_lr": 0.0 if cfg.optim.warmup_steps else cfg.optim.lr, "warmup_max_lr": cfg.optim.lr, "warmup_num_steps": max(cfg.optim.warmup_steps, 1),
            "total_num_steps": cfg.run.max_steps, "warmup_type": "linear"}},
        "steps_per_print": 10**9,
    }


def measure_peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    """Matmul FLOP/s of this device in the training dtype: the denominator of MFU."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, k = time.perf_counter(), 5
    for _ in range(k):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * k / (time.perf_counter() - t)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forever(loader: ShardLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(cfg: TrainConfig) -> dict[str, Any]:
    import deepspeed

    world_env = int(__import__("os").environ.get("WORLD_SIZE", 1))
    plan = preflight(cfg, world_env)
    backend = D.init(cfg.deepspeed.timeout_s)
    rank, world = D.world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout,
                        force=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    prec = resolve_precision(cfg.model, cuda)
    torch.manual_seed(cfg.run.seed)
    out = Path(cfg.run.output_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save(cfg, out / "config.yaml")
    kind = "contrastive" if cfg.stage == 1 else "listwise"
    loader = ShardLoader(cfg.shards, cfg.loader, kind=kind, tokenizer_fingerprint=plan.fingerprint)

    backbone, attn = load_backbone(plan.model_path, cfg.model, prec.dtype, cuda)
    n_params = sum(p.numel() for p in backbone.parameters())
    # FLOPs count matmul weights only: the input embedding is a lookup (nanoGPT excludes it likewise)
    n_flop_params = n_params - backbone.get_input_embeddings().weight.numel()
    model = Encoder(backbone, cfg.model.pooling)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config(cfg, prec.name == "bf16", backbone.config.hidden_size))
    step, run_id = 0, None
    tag = C.latest(ckpt_dir)
    if tag:
        state = C.load(engine, ckpt_dir, tag)
        loader.load_state_dict(state["loader"])
        step, run_id = state["step"], state.get("mlflow_run_id")
    tracker = Tracker(out, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name, run_id, rank == 0)

    g = loader.manifest["max_slate"] if cfg.stage == 2 else 1 + cfg.loader.negatives_per_query
    if cfg.stage == 2 and cfg.loader.slate_size:
        g = cfg.loader.slate_size
    negatives = cfg.loader.batch_size * world * g - 1
    peak = cfg.run.peak_flops or measure_peak_flops(prec.dtype, device)
    info = {"stage": cfg.stage, "world_size": world, "backend": backend, "attention": attn, "dtype": prec.name,
            "zero_stage": cfg.deepspeed.zero_stage, "negatives_per_query": negatives, "params": n_params,
            "global_batch": cfg.loader.batch_size * world * cfg.loader.grad_accum,
            "batches_per_epoch": len(loader), "dropped_per_epoch": loader.dropped_per_epoch,
            "peak_flops_per_device": round(peak), "resumed_from": tag or ""}
    log.info("[train] " + " ".join(f"{k}={v}" for k, v in info.items()))
    if not tag:
        tracker.params(to_dict(cfg), info)
        tracker.artifact(out / "config.yaml")
        if rank == 0:
            import shutil

            shutil.copy(Path(cfg.shards) / "manifest.json", out / "data_manifest.json")
        tracker.artifact(out / "data_manifest.json")
    tracker.tag("resumed_from", tag or "")

    stop_at = min(cfg.run.max_steps, step + cfg.run.stop_after_steps) if cfg.run.stop_after_steps else cfg.run.max_steps
    batches = _forever(loader)
    bad_in_row, skipped = 0, 0
    engine.train()
    while step < stop_at:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = real = samples = 0
        for _ in range(cfg.loader.grad_accum):
            batch = _to(next(batches), device)
            terms = compute(engine, batch, cfg.stage, cfg.loss)
            finite = torch.tensor(float(torch.isfinite(terms["loss"]).item()))
            if D.mean_across(finite).item() < 1.0:  # any rank non-finite: every rank skips, in step
                skipped += 1
                bad_in_row += 1
                log.warning("[train] step %d: non-finite loss, micro-batch skipped (%d in a row)", step + 1, bad_in_row)
                if bad_in_row >= cfg.run.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_row} consecutive micro-batches had NaN/Inf losses (run.max_bad_steps="
                        f"{cfg.run.max_bad_steps}); lower optim.lr or check loss.temperature and the data"
                    )
                continue
            bad_in_row = 0
            engine.backward(terms["loss"])
            engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + D.mean_across(v).item() / cfg.loader.grad_accum
            tokens += batch["padded_tokens"]
            real += batch["real_tokens"]
            samples += batch["query_input_ids"].shape[0]
        if not sums:
            continue
        step += 1
        dt = time.perf_counter() - t0
        flops = 6 * n_flop_params * tokens  # forward + backward per token (attention FLOPs excluded)
        metrics = {
            "loss": sums["loss"], "infonce": sums["infonce"], "accuracy": sums["accuracy"],
            "masked_negatives": sums["masked_negatives"], "lr": engine.get_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0), "step_time_s": dt,
            "samples_per_s": samples * world / dt, "tokens_per_s": real * world / dt,
            "mfu": flops / dt / peak, "peak_mem_gb": _peak_mem_gb(device), "skipped_micro_batches": skipped,
            "padding_efficiency": loader.padding_efficiency, "epoch": loader.epoch,
        }
        if "ranknet" in sums:
            metrics["ranknet"] = sums["ranknet"]
        if step % cfg.run.log_every == 0 or step == stop_at:
            tracker.metrics(step, metrics)
            log.info(
                f"[train] step {step}/{cfg.run.max_steps} | loss {metrics['loss']:.4f} (infonce {metrics['infonce']:.4f}"
                + (f" ranknet {metrics['ranknet']:.4f}" if "ranknet" in metrics else "")
                + f") | acc {metrics['accuracy']:.2f} | lr {metrics['lr']:.2e} | gnorm {metrics['grad_norm']:.3f} | "
                f"{metrics['samples_per_s']:.1f} samples/s {metrics['tokens_per_s']:.0f} tok/s | {dt:.2f}s | "
                f"mfu {metrics['mfu']:.1%} | mem {metrics['peak_mem_gb']:.2f}GB"
            )
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.run.max_steps):
            tracker.metrics(step, _dev_eval(engine, cfg, plan))
        if step % cfg.run.save_every == 0 or step == stop_at:
            C.save(engine, ckpt_dir, step, {"loader": loader.state_dict(), "mlflow_run_id": tracker.run_id,
                                             "config": to_dict(cfg)})
    result = {"step": step, "run_id": tracker.run_id, "info": info}
    final = C.latest(ckpt_dir)
    if step >= cfg.run.max_steps and cfg.run.export and final:
        result["export"] = str(_export(engine, cfg, plan, ckpt_dir, final, out))
        tracker.tag("export", result["export"])
    tracker.close()
    return result


_DEV: dict[str, Any] = {}  # the dev set, instructions and text encoder: loaded once per run, not per evaluation


def _dev_setup(cfg: TrainConfig, plan: Plan):
    if not _DEV:
        from data_pipeline.instructions import InstructionTable

        from .evaluation import load_beir, load_rankgpt

        e = cfg.eval
        es = load_rankgpt(e.data, e.qrels or None) if e.data.endswith(".json") else load_beir(e.data, e.split, e.run or None)
        keep = sorted(es.run)[: e.max_queries]
        es.run = {q: es.run[q] for q in keep}
        tok_cfg = from_dict(TokenizationConfig, {**plan.manifest["config"]["tokenization"], "tokenizer": plan.model_path})
        _DEV.update(es=es, ins=InstructionTable.load().lookup(e.source or es.name, allow_unknown=True),
                    text=TextEncoder(load_tokenizer(plan.model_path), tok_cfg))
    return _DEV["es"], _DEV["ins"], _DEV["text"]


def _dev_eval(engine, cfg: TrainConfig, plan: Plan) -> dict[str, float]:
    """NDCG@10 / MRR@10 / Recall@100 of both scoring modes on the dev set, with the live (partitioned) engine."""
    from .evaluation import evaluate
    from .reranker import Reranker

    e = cfg.eval
    es, ins, text = _dev_setup(cfg, plan)
    rer = Reranker(None, text, cfg.model.pooling, device=str(engine.device), encode=lambda ids, mask: engine(ids, mask))
    engine.eval()
    with torch.no_grad():
        res = evaluate(rer, es, query_instruction=ins.query[0], rerank_instruction=ins.rerank, prompt_k=e.prompt_k,
                       progress=False)
    engine.train()
    out = {f"dev_{mode}_{k.lower().replace('@', '_at_')}": v for mode in ("retrieval", "listwise")
           for k, v in res[mode].items()}
    log.info("[eval] " + " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


def _export(engine, cfg: TrainConfig, plan: Plan, ckpt_dir: Path, tag: str, out: Path) -> Path:
    """Rank 0 consolidates the last checkpoint; every rank encodes a probe batch so the export can be checked."""
    probe = next(iter(ShardLoader(cfg.shards, cfg.loader, rank=0, world_size=1)))
    engine.eval()
    with torch.no_grad():
        emb = engine(probe["doc_input_ids"].to(engine.device), probe["doc_attention_mask"].to(engine.device))
    engine.train()
    export_dir = out / "export"
    if D.is_main():
        mf = plan.manifest["config"]["tokenization"]
        info = {"pooling": cfg.model.pooling, "normalize": True, "text_format": mf, "eos_id": plan.manifest["tokenizer"]["eos_id"],
                "tokenizer_fingerprint": plan.fingerprint, "stage": cfg.stage, "checkpoint": str(ckpt_dir / tag)}
        C.export(ckpt_dir, tag, plan.model_path, plan.model_path, export_dir, info)
        torch.save({"input_ids": probe["doc_input_ids"], "attention_mask": probe["doc_attention_mask"], "embeddings": emb},
                   out / "probe_embeddings.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return export_dir

