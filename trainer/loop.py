"""The training loop, torchtitan-style: `Trainer.__init__` sets up (process group, loader, engine, resume,
tracker), `train_step` is one optimizer step (batch -> embeddings -> losses -> backward -> step), `train` is the
loop. The components decide when they act: the validator (validator.py), the checkpointer (checkpointer.py), the
metrics logger (metrics.py) and the time budget (time_budget.py). Values derived from the config (the per-rank batch)
are computed here and never written back into it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common.cpu_allocator import set_cpu_allocator
from common.typed_config import save, to_dict
from modeling import distributed as D
from modeling.chunking import ChunkStats
from modeling.embedding import Encoder
from modeling.export_format import EXPORT_INFO
from modeling.profiling import phase, phase_seconds, top_operators

from .checkpointer import Checkpointer
from .config import TrainConfig
from .flops import attention_shape, measure_peak_flops
from .grad_cache import CachedStep
from .loader import ShardLoader
from .memory import GB, Estimate, advice, available_bytes, estimate
from .metrics import MetricsLogger, PhaseClock
from .model import load_backbone, resolve_precision
from .objective import compute
from .preflight import PreflightError, preflight
from .schedule import make_scheduler, retarget
from .stream import make_loader
from .time_budget import TimeBudget
from .tracking import Tracker
from .validator import Validator
from .zero import client_optimizer, ds_config, make_optimizer, master_weights, reduce_once
from .zero import plan as zero_plan

__all__ = ["PreflightError", "Trainer", "train"]
log = logging.getLogger(__name__)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forever(loader: ShardLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed

        t_start = time.perf_counter()
        self.cfg = cfg
        self.plan = preflight(cfg, D.env_world_size())
        self.backend = D.init(cfg.deepspeed.timeout_s)
        self.rank, self.world = D.world()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING, format="%(message)s",
                            stream=sys.stdout, force=True)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.prec = resolve_precision(cfg.model, cuda)
        self.malloc_set = not cuda and set_cpu_allocator(cfg.run.cpu_allocator)  # before the model and activations
        self.flush_denormal = not cuda and cfg.run.flush_denormal and torch.set_flush_denormal(True)
        torch.manual_seed(cfg.run.seed)
        self.out = Path(cfg.run.output_dir)
        self.validator = Validator(cfg, self.plan)
        self.budget = TimeBudget(cfg.run.time_budget_s, cfg.eval.every, t_start)
        self.checkpointer = Checkpointer(cfg, self.plan, self.out, self.rank, self.world)
        # the per-rank batch: run.global_batch_size / (world x grad_accum) when set, kept across a resharded resume
        self.resume = self.checkpointer.find(
            dataclasses.replace(cfg.loader, batch_size=cfg.micro_batch_size(self.world)))
        self.loader_cfg = self.resume.loader
        if self.rank == 0:
            save(cfg, self.out / "config.yaml")
        self.loader = make_loader(cfg.shards, self.loader_cfg, rank=self.rank, world_size=self.world,
                                  manifest=self.plan.manifest)

        backbone, self.attn = load_backbone(self.plan.model_path, cfg.model, self.prec.dtype, cuda)
        self.n_params = sum(p.numel() for p in backbone.parameters())
        largest = max(p.numel() for p in backbone.parameters())
        self.zero = zero_plan(cfg, n_params=self.n_params, largest=largest, bytes_per=self.prec.dtype.itemsize,
                              rank_bytes=self._rank_bytes(), cuda=cuda, resumed_stage=self.resume.zero_stage)
        self.memory = self._check_memory(backbone.config, persistent=self.zero.persistence_threshold > largest)
        model = Encoder(backbone, cfg.model.pooling)
        log.info("[zero] ZeRO-%d, persistence threshold %d, reduce bucket %d: %s", self.zero.stage,
                 self.zero.persistence_threshold, self.zero.reduce_bucket_size, self.zero.reason)
        params = [p for p in model.parameters() if p.requires_grad]
        self.master = master_weights(cfg, self.zero.stage, self.prec.name == "bf16")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params,
            optimizer=make_optimizer(cfg, params, self.master) if client_optimizer(cfg) else None,
            lr_scheduler=make_scheduler(cfg.optim.warmup_steps, cfg.run.max_steps),
            config=ds_config(cfg, self.prec.name == "bf16", backbone.config.hidden_size, cuda, self.resume.reshard,
                             self.zero, micro_batch=self.loader_cfg.batch_size,
                             autocast=self.prec.name == "bf16-autocast"))
        if self.master:  # MasterAdamW reduces the step's gradients once, in its step
            self.engine.enable_backward_allreduce = False
        self.cache = CachedStep(self.engine, cfg.encode.chunk_tokens, min_efficiency=cfg.encode.min_chunk_efficiency) \
            if cfg.encode.grad_cache else None

        self.step, run_id = 0, None
        self.max_steps = cfg.run.max_steps  # lowered by run.time_budget_s, saved with checkpoints
        if self.resume.tag:
            state = self.checkpointer.load(self.engine, self.resume)
            self.loader.load_state_dict(state["loader"])
            self.step, run_id = state["step"], state.get("mlflow_run_id")
            self._set_max_steps(min(self.max_steps, state.get("max_steps", self.max_steps)), "resumed")
        self.tracker = Tracker(self.out, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name,
                               run_id, self.rank == 0)
        peak = cfg.run.peak_flops or measure_peak_flops(self.prec.compute, self.device)
        # FLOPs count matmul weights only: the input embedding is a lookup (nanoGPT excludes it likewise)
        self.metrics = MetricsLogger(log_every=cfg.run.log_every, world=self.world, device=self.device,
                                     flop_params=self.n_params - backbone.get_input_embeddings().weight.numel(),
                                     attn_shape=attention_shape(backbone.config), causal=model.causal, peak_flops=peak)
        self.skipped = self.bad_in_row = 0
        self._log_start(peak)

    # -- setup helpers ---------------------------------------------------------------------------------------------
    def _link_init_run(self) -> None:
        """Stage 2 from a stage-1 export: tag the run that made it, and make that run the parent when both are in
        the same tracking store, so the two stages are one tree in one experiment."""
        info = Path(self.plan.model_path) / EXPORT_INFO
        if not info.is_file():
            return
        made_by = json.loads(info.read_text())
        rid = made_by.get("mlflow_run_id")
        if rid:
            self.tracker.tag("e2rank.init_run_id", rid)
            if made_by.get("tracking_uri") == getattr(self.tracker, "uri", None):
                self.tracker.tag("mlflow.parentRunId", rid)

    def _graph_tokens(self) -> int:
        """Padded tokens whose activations live at once: one GradCache chunk, or a whole micro-batch."""
        cfg, st = self.cfg, self.loader.manifest.get("lengths", {})
        if cfg.encode.grad_cache:
            return cfg.encode.chunk_tokens
        p95 = {f: int((st.get(f, {}) or {}).get("p95", 0)) for f in ("query", "doc", "prompt")}
        g = self.loader.slate_size if cfg.stage == 2 else 1 + cfg.loader.negatives_per_query
        n = self.loader_cfg.batch_size * (p95["query"] + g * p95["doc"] + (p95["prompt"] if cfg.stage == 2 else 0))
        return n

    def _rank_bytes(self) -> float:
        """Memory one rank may use: the device's free memory, or on CPU the machine's shared by its local ranks."""
        return self.cfg.encode.max_memory_gb * GB or available_bytes(self.device) / (
            1 if self.device.type == "cuda" else max(D.local_world_size(), 1))

    def _check_memory(self, config, persistent: bool) -> Estimate:
        cfg = self.cfg
        est = estimate(params=self.n_params, hidden=config.hidden_size, layers=config.num_hidden_layers,
                       bytes_per=2 if self.prec.name == "bf16" else 4, world=self.world,
                       zero_stage=self.zero.stage, graph_tokens=self._graph_tokens(),
                       grad_ckpt=cfg.model.gradient_checkpointing, offload_optimizer=cfg.deepspeed.offload_optimizer,
                       persistent=persistent)
        limit = self._rank_bytes()
        log.info(f"[memory] estimate per rank {est.describe()}; limit {limit / GB:.1f} GB")
        if est.total > limit:
            raise PreflightError(
                f"this configuration needs about {est.total / GB:.1f} GB per rank ({est.describe()}) but "
                f"{limit / GB:.1f} GB is available per rank; "
                f"try {advice(est, cfg.model.gradient_checkpointing, cfg.encode.grad_cache)}"
                " (or set encode.max_memory_gb to override)"
            )
        return est

    def _log_start(self, peak: float) -> None:
        cfg, lc = self.cfg, self.loader_cfg
        g = self.loader.slate_size if cfg.stage == 2 else 1 + cfg.loader.negatives_per_query
        scored_ranks = self.world if cfg.loss.negatives_across_ranks(cfg.stage) else 1
        self.info = {
            "stage": cfg.stage,
            "world_size": self.world,
            "backend": self.backend,
            "attention": self.attn,
            "dtype": self.prec.name,
            "zero_stage": self.zero.stage,
            "optimizer": "fp32-master AdamW (trainer)" if self.master else "DeepSpeed",
            "negatives_per_query": lc.batch_size * scored_ranks * g - 1,
            "params": self.n_params,
            "global_batch": lc.batch_size * self.world * lc.grad_accum,
            "micro_batch": lc.batch_size,
            "grad_cache": cfg.encode.grad_cache,
            "chunk_tokens": cfg.encode.chunk_tokens,
            "memory_estimate_gb": round(self.memory.total / GB, 2),
            "cpu_allocator": cfg.run.cpu_allocator if self.malloc_set else "default",
            "flush_denormal": bool(self.flush_denormal),
            "batches_per_epoch": len(self.loader),
            "dropped_per_epoch": self.loader.dropped_per_epoch,
            "peak_flops_per_device": round(peak),
            "threads": torch.get_num_threads(),
            "resumed_from": self.resume.tag or "",
        }
        log.info("[train] " + " ".join(f"{k}={v}" for k, v in self.info.items()))
        if not self.resume.tag:
            self.tracker.params(to_dict(cfg), self.info)
            self.tracker.artifact(self.out / "config.yaml")
            if self.rank == 0:
                shutil.copy(Path(cfg.shards) / "manifest.json", self.out / "data_manifest.json")
            self.tracker.artifact(self.out / "data_manifest.json")
        self.tracker.tag("resumed_from", self.resume.tag or "")
        self._link_init_run()

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # We own the accumulation boundary (DeepSpeed's counter would drift when a micro-batch is skipped, and
        # GradCache calls backward once per chunk): True only on the step's last backward.
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """grad_accum micro-batches -> one optimizer step. A micro-batch whose loss is non-finite on any rank is
        skipped on every rank (no backward). We own the accumulation boundary: every backward says whether it is the
        step's last, and engine.step() runs once per optimizer step, so a skipped micro-batch cannot shift
        DeepSpeed's boundary (its own counter would). Returns the step's sums, or None if every micro-batch was
        skipped (no optimizer step, no LR step)."""
        accum = self.cfg.loader.grad_accum
        sums: dict[str, float] = {}
        stats = ChunkStats()
        clock = PhaseClock(self.device)
        counts: dict[str, Any] = {"samples": 0, "done": 0, "stepped": False}
        # several backwards (GradCache: one per chunk; accumulation) reduce gradients once, as the block exits
        with phase("backward"), reduce_once(self.engine, accum * (2 if self.cache else 1)):
            self._micro_batches(batches, accum, stats, sums, clock, counts)
        clock.lap("backward")
        samples, done, stepped = counts["samples"], counts["done"], counts["stepped"]
        if not done:
            return None
        self.engine.set_gradient_accumulation_boundary(True)
        lr = self.engine.get_lr()[0]  # this step's LR: after engine.step() the optimizer holds the next one's
        with phase("optimizer"):
            self.engine.step()
        clock.lap("optimizer")
        if not stepped:  # the last micro-batch was skipped: its backward never told DeepSpeed "boundary"
            log.warning("[train] step %d: optimizer step on %d of %d micro-batches", self.step + 1, done, accum)
        return {
            "sums": {k: v / done for k, v in sums.items()},
            "stats": stats,
            "samples": samples,
            "phases": clock.seconds,
            "lr": lr,
        }

    def _micro_batches(
        self, batches, accum: int, stats: ChunkStats, sums: dict[str, float], clock: PhaseClock, counts: dict[str, Any]
    ) -> None:
        """Forward and backward of the step's micro-batches (the optimizer step is the caller's)."""
        cfg = self.cfg
        for a in range(accum):
            last = a == accum - 1
            with phase("data"):
                batch = _to(next(batches), self.device)
            clock.lap("data")
            with phase("forward"):
                if self.cache:
                    terms = self.cache.forward(batch, cfg.stage, cfg.loss, stats)
                else:
                    terms = compute(
                        self.engine,
                        batch,
                        cfg.stage,
                        cfg.loss,
                        cfg.encode.chunk_tokens,
                        stats,
                        cfg.encode.min_chunk_efficiency,
                    )
            clock.lap("forward")
            with phase("sync"):
                finite = D.mean_across(torch.isfinite(terms["loss"]).float()).item() == 1.0  # any rank: all skip
            if not finite:
                self._skip(terms)
                continue
            self.bad_in_row = 0
            with phase("backward"):
                if self.cache:
                    self.cache.backward(lambda s, end, last=last: self._backward(s, last and end))
                else:
                    self._backward(terms["loss"], last)
            clock.lap("backward")
            counts["stepped"] = last
            counts["done"] += 1
            with phase("sync"):
                # one collective for every logged term, not one per term
                names = sorted(terms)
                means = D.mean_across(torch.stack([terms[k].detach().float().reshape(()) for k in names])).tolist()
            for k, v in zip(names, means):
                sums[k] = sums.get(k, 0.0) + v
            counts["samples"] += batch["query_input_ids"].shape[0]

    def _profiled(self, batches):
        """One step under torch.profiler (run.profile_step): the top operators by self CPU and by device time go to
        profile.txt in the output folder (rank 0)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            out = self.train_step(batches)
        wall = time.perf_counter() - t
        if self.rank == 0:
            ka = prof.key_averages()
            text = top_operators(prof)
            if self.device.type == "cuda":
                text += "\n\n" + ka.table(sort_by="self_cuda_time_total", row_limit=25)
            out_dir = Path(self.cfg.run.output_dir)
            (out_dir / "profile.txt").write_text(text)
            phases = {"step_wall_s": wall, "phases_s": phase_seconds(prof), "clock_s": out["phases"] if out else {}}
            (out_dir / "profile_phases.json").write_text(json.dumps(phases, indent=1))
            log.info(
                "[train] step %d profiled -> %s, %s",
                self.step + 1,
                out_dir / "profile.txt",
                out_dir / "profile_phases.json",
            )
        return out

    def _skip(self, terms: dict[str, torch.Tensor]) -> None:
        self.skipped += 1
        self.bad_in_row += 1
        log.warning(
            "[train] step %d: non-finite loss, micro-batch skipped (%d in a row)", self.step + 1, self.bad_in_row
        )
        if self.cache:
            self.cache.discard()
        if self.bad_in_row >= self.cfg.run.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_in_row} consecutive micro-batches had NaN/Inf losses (run.max_bad_steps="
                f"{self.cfg.run.max_bad_steps}); lower optim.lr or check loss.temperature and the data"
            )

    # -- the loop --------------------------------------------------------------------------------------------------
    def _set_max_steps(self, n: int, why: str) -> None:
        if n != self.max_steps:
            log.info("[train] max_steps %d -> %d (%s); the LR schedule now ends at step %d", self.max_steps, n, why, n)
            self.max_steps = n
        retarget(self.engine.lr_scheduler, n)  # also when unchanged: a resumed schedule ends where this run does

    def save(self) -> None:
        self.checkpointer.save(
            self.engine,
            self.step,
            {
                "loader": self.loader.state_dict(),
                "max_steps": self.max_steps,
                "zero_stage": self.zero.stage,
                "mlflow_run_id": self.tracker.run_id,
                "config": to_dict(self.cfg),
            },
        )

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        until = self.step + cfg.run.stop_after_steps if cfg.run.stop_after_steps else None
        batches = _forever(self.loader)
        self.engine.train()
        while self.step < (stop_at := min(self.max_steps, until or self.max_steps)):
            t0 = time.perf_counter()
            out = self._profiled(batches) if cfg.run.profile_step == self.step + 1 else self.train_step(batches)
            if out is None:
                continue
            self.step += 1
            dt = time.perf_counter() - t0
            if cfg.run.profile_step != self.step:  # a profiled step is slow: it would shrink the budget's plan
                self.budget.record_step(dt)
            m = self.metrics.compute(
                out,
                dt,
                grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
                skipped=self.skipped,
                loader=self.loader,
            )
            if self.metrics.should_log(self.step, stop_at):
                self.tracker.metrics(self.step, m)
                log.info(self.metrics.line(self.step, self.max_steps, m))
            if self.validator.should_run(self.step, self.max_steps):
                t1 = time.perf_counter()
                self.tracker.metrics(self.step, self.validator(self.engine))
                self.budget.record_eval(time.perf_counter() - t1)
            if self.step < self.max_steps and (fit := self.budget.fit(self.step, self.max_steps)):
                self._set_max_steps(*fit)
            stop_at = min(self.max_steps, until or self.max_steps)
            if self.checkpointer.should_save(self.step, stop_at):
                self.save()
        result = {"step": self.step, "run_id": self.tracker.run_id, "info": self.info}
        final = self.checkpointer.latest()
        if self.step >= self.max_steps and cfg.run.export and final:
            run = {
                "mlflow_run_id": self.tracker.run_id,
                "tracking_uri": getattr(self.tracker, "uri", None),
                "steps": self.step,
            }
            result["export"] = str(self.checkpointer.export(self.engine, self.loader_cfg, final, run))
            self.tracker.tag("export", result["export"])
            if cfg.tracking.log_model:
                result["model_uri"] = self.tracker.model(Path(result["export"]), cfg.tracking.register_as)
            if cfg.tracking.log_export:
                self.tracker.artifact_dir(Path(result["export"]), "export")
        self.tracker.close()
        return result


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).train()
