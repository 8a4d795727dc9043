"""The training loop: one readable step (batch -> embeddings -> losses -> backward -> step -> log) on a DeepSpeed
engine. Everything distributed, I/O or MLflow is one call away (distributed.py, checkpoint.py, tracking.py);
chunked encoding is trainer/chunking.py, GradCache trainer/grad_cache.py."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.pretrained import load_tokenizer, resolve
from common.typed_config import from_dict, save, to_dict
from data_pipeline.shards import read_manifest
from data_pipeline.text import TextEncoder, TokenizationConfig

from . import checkpoint as C
from . import distributed as D
from . import model_card
from .chunking import ChunkStats
from .config import TrainConfig
from .flops import attention_shape, step_flops
from .grad_cache import CachedStep
from .loader import ShardLoader, make_loader
from .memory import GB, Estimate, advice, available_bytes, estimate, set_cpu_allocator
from .model import Encoder, load_backbone, resolve_precision
from .objective import compute
from .profiling import phase, phase_seconds, top_operators
from .schedule import make_scheduler, retarget
from .tracking import Tracker
from .zero import client_optimizer, ds_config, make_optimizer, reduce_once
from .zero import plan as zero_plan

log = logging.getLogger("e2rank")


class PreflightError(ValueError):
    """Something to fix before training can start; the message says what."""


@dataclass
class Plan:
    model_path: str
    manifest: dict[str, Any]
    fingerprint: str


class PhaseClock:
    """Seconds per phase of a step (data, forward, backward, optimizer), device-synchronised at each lap so GPU time
    lands in the phase that queued it."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.t
        self.t = now


def preflight(cfg: TrainConfig, world_size: int) -> Plan:
    """Checks that need no process group, changing nothing: model path, shards vs tokenizer, batch divisibility.
    Returns what they resolved (the model folder, the manifest, read once per run, and the tokenizer fingerprint)."""
    from .tracking import TrackingAccessError, check_access

    try:  # every rank asks, so every rank stops alike (no rank left waiting at a collective)
        check_access(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    except TrackingAccessError as e:
        raise PreflightError(f"tracking: {e}") from e
    try:
        model_path = str(resolve(cfg.model.path, weights=True))
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(f"model.path: {e}") from e
    if not (Path(model_path) / "config.json").is_file():
        raise PreflightError(f"model.path {model_path} has no config.json: not a Hugging Face model folder")
    kind = "contrastive" if cfg.stage == 1 else "listwise"
    try:
        manifest = read_manifest(cfg.shards, kind=kind, local_shards=not cfg.loader.stream_url)
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
    return Plan(model_path, manifest, fp)


def measure_peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    """Matmul FLOP/s of this rank in the training dtype with the threads it trains with: the denominator of MFU.
    The best of 3 timings into a preallocated output (a fresh output per product would time the allocator too)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.matmul(a, a, out=c)
    best, k = float("inf"), 3
    for _ in range(3):
        sync()
        t = time.perf_counter()
        for _ in range(k):
            torch.matmul(a, a, out=c)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * k / best


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forever(loader: ShardLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Trainer:
    """torchtitan-style: `__init__` sets up (process group, loader, engine, resume, tracker), `train_step` is one
    optimizer step, `metrics` turns a step into a log line, `evaluate` runs the dev set, `train` is the loop."""

    def __init__(self, cfg: TrainConfig):
        import deepspeed

        self.t_start = time.perf_counter()
        self.cfg = cfg
        self.plan = preflight(cfg, D.env_world_size())
        self.backend = D.init(cfg.deepspeed.timeout_s)
        self.rank, self.world = D.world()
        cfg.loader.batch_size = cfg.micro_batch_size(self.world)  # derived from run.global_batch_size when set
        self.validator = Validator(cfg, self.plan)
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING, format="%(message)s",
                            stream=sys.stdout, force=True)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.prec = resolve_precision(cfg.model, cuda)
        self.malloc_set = not cuda and set_cpu_allocator(cfg.run.cpu_allocator)  # before the model and activations
        torch.manual_seed(cfg.run.seed)
        self.out = Path(cfg.run.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.resumed_from, self.reshard = self._find_checkpoint()
        if self.rank == 0:
            save(cfg, self.out / "config.yaml")
        self.loader = make_loader(cfg.shards, cfg.loader, rank=self.rank, world_size=self.world,
                                  manifest=self.plan.manifest)

        backbone, self.attn = load_backbone(self.plan.model_path, cfg.model, self.prec.dtype, cuda)
        self.n_params = sum(p.numel() for p in backbone.parameters())
        # FLOPs count matmul weights only: the input embedding is a lookup (nanoGPT excludes it likewise)
        self.n_flop_params = self.n_params - backbone.get_input_embeddings().weight.numel()
        self.attn_shape = attention_shape(backbone.config)
        largest = max(p.numel() for p in backbone.parameters())
        self.zero = zero_plan(cfg, n_params=self.n_params, largest=largest, bytes_per=self.prec.dtype.itemsize,
                              rank_bytes=self._rank_bytes(), cuda=cuda, resumed_stage=self.resumed_stage)
        self.memory = self._check_memory(backbone.config, persistent=self.zero.persistence_threshold > largest)
        model = Encoder(backbone, cfg.model.pooling)
        log.info("[zero] ZeRO-%d, persistence threshold %d, reduce bucket %d: %s", self.zero.stage,
                 self.zero.persistence_threshold, self.zero.reduce_bucket_size, self.zero.reason)
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params,
            optimizer=make_optimizer(cfg, params) if client_optimizer(cfg) else None,
            lr_scheduler=make_scheduler(cfg.optim.warmup_steps, cfg.run.max_steps),
            config=ds_config(cfg, self.prec.name == "bf16", backbone.config.hidden_size, cuda, self.reshard, self.zero))
        self.cache = CachedStep(self.engine, cfg.encode.chunk_tokens, min_efficiency=cfg.encode.min_chunk_efficiency) \
            if cfg.encode.grad_cache else None

        self.step, run_id = 0, None
        self.max_steps = cfg.run.max_steps  # lowered by run.time_budget_s (fit_budget), saved with checkpoints
        self.step_times: list[float] = []
        self.eval_times: list[float] = []
        if self.resumed_from:
            state = C.load(self.engine, self.ckpt_dir, self.resumed_from, universal=self.reshard)
            self.loader.load_state_dict(state["loader"])
            self.step, run_id = state["step"], state.get("mlflow_run_id")
            self._set_max_steps(min(self.max_steps, state.get("max_steps", self.max_steps)), "resumed")
        self.tracker = Tracker(self.out, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name,
                               run_id, self.rank == 0)
        self.peak = cfg.run.peak_flops or measure_peak_flops(self.prec.dtype, self.device)
        self.skipped = self.bad_in_row = 0
        self._log_start()

    # -- setup helpers ---------------------------------------------------------------------------------------------
    def _find_checkpoint(self) -> tuple[str | None, bool]:
        """The checkpoint to resume from, and whether it was written by another number of ranks. Then the global
        batch is kept (per-rank batch size adjusted, or a clear error) and rank 0 converts it to DeepSpeed's
        universal format, which every rank re-partitions on load (node loss is the common case on clusters)."""
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if gone := C.clean(self.ckpt_dir):
                log.warning("[train] removed what an interrupted save left: %s", ", ".join(gone))
        D.barrier()
        tag = C.latest(self.ckpt_dir)
        state = C.trainer_state(self.ckpt_dir, tag) if tag else {}
        # the stage the checkpoint was written with (resolved, for zero_stage auto)
        was = state.get("zero_stage", state.get("config", {}).get("deepspeed", {}).get("zero_stage"))
        self.resumed_stage = was if isinstance(was, int) else None
        now = self.cfg.deepspeed.zero_stage
        if tag and self.resumed_stage is not None and now != "auto" and self.resumed_stage != now:
            # the optimizer states are partitioned differently per stage: loading one into the other is not a resume
            raise PreflightError(
                f"checkpoint {self.ckpt_dir / tag} was written with DeepSpeed ZeRO-{was} and this run asks for "
                f"ZeRO-{now}: resume it with deepspeed.zero_stage={was}, or start in another run.output_dir")
        if not tag or (old := C.saved_world(self.ckpt_dir, tag, state)) == self.world:
            return tag, False
        lc = self.cfg.loader
        was = state["loader"]["config"]
        g = was["batch_size"] * old * was["grad_accum"]
        if lc.batch_size * self.world * lc.grad_accum != g:
            if g % (self.world * lc.grad_accum):
                raise PreflightError(
                    f"checkpoint {tag} was written by {old} ranks with a global batch of {g}; it does not divide "
                    f"across {self.world} ranks x loader.grad_accum={lc.grad_accum}: set loader.grad_accum so that "
                    f"{self.world} x grad_accum divides {g}")
            lc.batch_size = g // (self.world * lc.grad_accum)
        log.info("[train] resuming %s (written by %d ranks) on %d: global batch %d kept as loader.batch_size=%d x "
                 "%d ranks x grad_accum=%d; converting to a universal checkpoint", tag, old, self.world, g,
                 lc.batch_size, self.world, lc.grad_accum)
        if self.rank == 0:
            C.to_universal(self.ckpt_dir, tag)
        D.barrier()
        return tag, True

    def _link_init_run(self) -> None:
        """Stage 2 from a stage-1 export: tag the run that made it, and make that run the parent when both are in
        the same tracking store, so the two stages are one tree in one experiment."""
        info = Path(self.plan.model_path) / "e2rank.json"
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
        n = cfg.loader.batch_size * (p95["query"] + g * p95["doc"] + (p95["prompt"] if cfg.stage == 2 else 0))
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
                f"{limit / GB:.1f} GB is available per rank; try {advice(est, cfg.model.gradient_checkpointing, cfg.encode.grad_cache)}"
                " (or set encode.max_memory_gb to override)"
            )
        return est

    def _log_start(self) -> None:
        cfg = self.cfg
        g = self.loader.slate_size if cfg.stage == 2 else 1 + cfg.loader.negatives_per_query
        scored_ranks = self.world if cfg.loss.negatives_across_ranks(cfg.stage) else 1
        self.info = {"stage": cfg.stage, "world_size": self.world, "backend": self.backend, "attention": self.attn,
                     "dtype": self.prec.name, "zero_stage": self.zero.stage,
                     "negatives_per_query": cfg.loader.batch_size * scored_ranks * g - 1, "params": self.n_params,
                     "global_batch": cfg.loader.batch_size * self.world * cfg.loader.grad_accum,
                     "grad_cache": cfg.encode.grad_cache, "chunk_tokens": cfg.encode.chunk_tokens,
                     "memory_estimate_gb": round(self.memory.total / GB, 2), "cpu_allocator": cfg.run.cpu_allocator if self.malloc_set else "default",
                     "batches_per_epoch": len(self.loader), "dropped_per_epoch": self.loader.dropped_per_epoch,
                     "peak_flops_per_device": round(self.peak), "threads": torch.get_num_threads(), "resumed_from": self.resumed_from or ""}
        log.info("[train] " + " ".join(f"{k}={v}" for k, v in self.info.items()))
        if not self.resumed_from:
            self.tracker.params(to_dict(cfg), self.info)
            self.tracker.artifact(self.out / "config.yaml")
            if self.rank == 0:
                shutil.copy(Path(cfg.shards) / "manifest.json", self.out / "data_manifest.json")
            self.tracker.artifact(self.out / "data_manifest.json")
        self.tracker.tag("resumed_from", self.resumed_from or "")
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
        return {"sums": {k: v / done for k, v in sums.items()}, "stats": stats, "samples": samples,
                "phases": clock.seconds, "lr": lr}

    def _micro_batches(self, batches, accum: int, stats: ChunkStats, sums: dict[str, float], clock: PhaseClock,
                       counts: dict[str, Any]) -> None:
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
                    terms = compute(self.engine, batch, cfg.stage, cfg.loss, cfg.encode.chunk_tokens, stats,
                                    cfg.encode.min_chunk_efficiency)
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
            log.info("[train] step %d profiled -> %s, %s", self.step + 1, out_dir / "profile.txt",
                     out_dir / "profile_phases.json")
        return out

    def _skip(self, terms: dict[str, torch.Tensor]) -> None:
        self.skipped += 1
        self.bad_in_row += 1
        log.warning("[train] step %d: non-finite loss, micro-batch skipped (%d in a row)", self.step + 1, self.bad_in_row)
        if self.cache:
            self.cache.discard()
        if self.bad_in_row >= self.cfg.run.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_in_row} consecutive micro-batches had NaN/Inf losses (run.max_bad_steps="
                f"{self.cfg.run.max_bad_steps}); lower optim.lr or check loss.temperature and the data")

    # -- metrics, evaluation ---------------------------------------------------------------------------------------
    def metrics(self, out: dict[str, Any], dt: float) -> dict[str, float]:
        s, st = out["sums"], out["stats"]
        real, padded, sq = (D.mean_across(torch.tensor([float(st.real), float(st.padded), float(st.sum_sq)]))
                            * self.world).tolist()
        # MFU on real tokens (padding is not useful work): trainer/flops.py, per rank, over this rank's measured peak
        flops = step_flops(self.n_flop_params, real, sq, *self.attn_shape, causal=self.engine.module.causal)
        padded_flops = step_flops(self.n_flop_params, padded, sq, *self.attn_shape, causal=self.engine.module.causal)
        m = {
            "loss": s["loss"], "infonce": s["infonce"], "accuracy": s["accuracy"],
            "masked_negatives": s["masked_negatives"], "lr": out["lr"],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0), "step_time_s": dt,
            "samples_per_s": out["samples"] * self.world / dt, "tokens_per_s": real / dt,
            "mfu": flops / self.world / dt / self.peak,
            "padded_mfu": padded_flops / self.world / dt / self.peak,
            "peak_mem_gb": _peak_mem_gb(self.device), "skipped_micro_batches": self.skipped,
            "padding_efficiency": real / max(padded, 1), "loader_padding_efficiency": self.loader.padding_efficiency,
            "forwards": st.forwards, "epoch": self.loader.epoch,
        }
        if "ranknet" in s:
            m["ranknet"] = s["ranknet"]
        m.update({f"time_{k}_s": v for k, v in out.get("phases", {}).items()})
        return m

    def log_line(self, m: dict[str, float]) -> str:
        return (
            f"[train] step {self.step}/{self.max_steps} | loss {m['loss']:.4f} (infonce {m['infonce']:.4f}"
            + (f" ranknet {m['ranknet']:.4f}" if "ranknet" in m else "")
            + f") | acc {m['accuracy']:.2f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | "
            f"{m['samples_per_s']:.1f} samples/s {m['tokens_per_s']:.0f} tok/s | {m['step_time_s']:.2f}s | "
            f"mfu {m['mfu']:.1%} | pad-eff {m['padding_efficiency']:.2f} | mem {m['peak_mem_gb']:.2f}GB | "
            + " ".join(f"{k[5:-2]} {v:.2f}s" for k, v in m.items() if k.startswith("time_"))
        )

    def evaluate(self) -> dict[str, float]:
        return self.validator(self.engine)

    def save(self) -> None:
        C.save(self.engine, self.ckpt_dir, self.step, {"loader": self.loader.state_dict(), "max_steps": self.max_steps,
                                                        "zero_stage": self.zero.stage,
                                                        "mlflow_run_id": self.tracker.run_id, "config": to_dict(self.cfg)},
               keep=self.cfg.run.keep_checkpoints)

    # -- the time budget -------------------------------------------------------------------------------------------
    def _evals_between(self, a: int, b: int) -> int:
        """Dev evaluations after steps a+1..b when the run ends at b (every N steps, and at the end)."""
        e = self.cfg.eval.every
        return 0 if not e else b // e - a // e + (b % e != 0)

    def fit_budget(self) -> None:
        """run.time_budget_s: the largest max_steps whose remaining steps (median step time), dev evaluations
        (mean so far) and final save + export (one step's time, twice over, as a margin) fit in what is left. The
        slowest rank decides, so every rank stops at the same step."""
        budget = self.cfg.run.time_budget_s
        if not budget or len(self.step_times) < 2:
            return
        step_t = sorted(self.step_times[1:])[len(self.step_times[1:]) // 2]  # the first step warms kernels up
        eval_t = sum(self.eval_times) / len(self.eval_times) if self.eval_times else 0.0
        left = budget - (time.perf_counter() - self.t_start) - 2 * step_t
        fit = self.step
        while fit < self.max_steps and (fit + 1 - self.step) * step_t + \
                self._evals_between(self.step, fit + 1) * eval_t <= left:
            fit += 1
        fit = -D.max_across(-max(fit, self.step + 1))
        if fit < self.max_steps:
            self._set_max_steps(fit, f"run.time_budget_s={budget:.0f}: {step_t:.2f}s/step, {eval_t:.1f}s/evaluation")

    def _set_max_steps(self, n: int, why: str) -> None:
        if n != self.max_steps:
            log.info("[train] max_steps %d -> %d (%s); the LR schedule now ends at step %d", self.max_steps, n, why, n)
            self.max_steps = n
        retarget(self.engine.lr_scheduler, n)  # also when unchanged: a resumed schedule ends where this run does

    # -- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        until = self.step + cfg.run.stop_after_steps if cfg.run.stop_after_steps else None
        batches = _forever(self.loader)
        self.engine.train()
        while self.step < (stop_at := min(self.max_steps, until or self.max_steps)):
            t0 = time.perf_counter()
            if cfg.run.profile_step == self.step + 1:
                out = self._profiled(batches)
            else:
                out = self.train_step(batches)
            if out is None:
                continue
            self.step += 1
            dt = time.perf_counter() - t0
            if cfg.run.profile_step != self.step:  # a profiled step is slow: it would shrink the budget's plan
                self.step_times.append(dt)
            m = self.metrics(out, dt)
            if self.step % cfg.run.log_every == 0 or self.step == stop_at:
                self.tracker.metrics(self.step, m)
                log.info(self.log_line(m))
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == self.max_steps):
                t1 = time.perf_counter()
                self.tracker.metrics(self.step, self.evaluate())
                self.eval_times.append(time.perf_counter() - t1)
            if self.step < self.max_steps:
                self.fit_budget()
            stop_at = min(self.max_steps, until or self.max_steps)
            if self.step % cfg.run.save_every == 0 or self.step == stop_at:
                self.save()
        result = {"step": self.step, "run_id": self.tracker.run_id, "info": self.info}
        final = C.latest(self.ckpt_dir)
        if self.step >= self.max_steps and cfg.run.export and final:
            run = {"mlflow_run_id": self.tracker.run_id, "tracking_uri": getattr(self.tracker, "uri", None),
                   "steps": self.step}
            result["export"] = str(_export(self.engine, cfg, self.plan, self.ckpt_dir, final, self.out, run))
            self.tracker.tag("export", result["export"])
            if cfg.tracking.log_model:
                result["model_uri"] = self.tracker.model(Path(result["export"]), cfg.tracking.register_as)
            if cfg.tracking.log_export:
                self.tracker.artifact_dir(Path(result["export"]), "export")
        self.tracker.close()
        return result


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).train()


class Validator:
    """The dev set (torchtitan's validator): loaded once per run on first use (set, instructions, text encoder), then
    NDCG@10 / MRR@10 / Recall@100 of both scoring modes with the live (partitioned) engine."""

    def __init__(self, cfg: TrainConfig, plan: Plan):
        self.cfg, self.plan, self._loaded = cfg, plan, None

    def _load(self):
        from data_pipeline.instructions import InstructionTable

        from .evaluation import load_eval_set

        e, plan = self.cfg.eval, self.plan
        es = load_eval_set(e.data, qrels=e.qrels or None, split=e.split, run=e.run or None, max_queries=e.max_queries)
        tok_cfg = from_dict(TokenizationConfig, {**plan.manifest["config"]["tokenization"], "tokenizer": plan.model_path})
        return (es, InstructionTable.load().lookup(e.source or es.name, allow_unknown=True),
                TextEncoder(load_tokenizer(plan.model_path), tok_cfg))

    def __call__(self, engine) -> dict[str, float]:
        from .evaluation import evaluate
        from .reranker import Reranker

        self._loaded = self._loaded or self._load()
        es, ins, text = self._loaded
        rer = Reranker(None, text, self.cfg.model.pooling, device=str(engine.device),
                       encode=lambda ids, mask: engine(ids, mask), shard=D.world())  # each rank 1/world of it
        engine.eval()
        with torch.no_grad():
            res = evaluate(rer, es, query_instruction=ins.query[0], rerank_instruction=ins.rerank,
                           prompt_k=self.cfg.eval.prompt_k, progress=False)
        engine.train()
        out = {f"dev_{mode}_{k.lower().replace('@', '_at_')}": v for mode in ("retrieval", "listwise")
               for k, v in res[mode].items()}
        log.info("[eval] " + " ".join(f"{k}={v:.4f}" for k, v in out.items()))
        return out


def _export(engine, cfg: TrainConfig, plan: Plan, ckpt_dir: Path, tag: str, out: Path,
            run: dict[str, Any] | None = None) -> Path:
    """Rank 0 consolidates the last checkpoint; every rank encodes a probe batch so the export can be checked."""
    probe = next(iter(make_loader(cfg.shards, cfg.loader, rank=0, world_size=1, manifest=plan.manifest)))
    engine.eval()
    with torch.no_grad():
        emb = engine(probe["doc_input_ids"].to(engine.device), probe["doc_attention_mask"].to(engine.device))
    engine.train()
    export_dir = out / "export"
    if D.is_main():
        mf = plan.manifest["config"]["tokenization"]
        base, earlier = model_card.lineage(plan.model_path)
        data = model_card.data_summary(plan.manifest, (Path(cfg.shards) / "manifest.json").read_bytes())
        info = {"pooling": cfg.model.pooling, "normalize": True, "text_format": mf, "eos_id": plan.manifest["tokenizer"]["eos_id"],
                "tokenizer_fingerprint": plan.fingerprint, "stage": cfg.stage, "checkpoint": str(ckpt_dir / tag),
                "base_model": cfg.model.path if not earlier else base, "data": data, "previous_stages": earlier,
                **(run or {})}
        C.export(ckpt_dir, tag, plan.model_path, plan.model_path, export_dir, info, card_config=to_dict(cfg))
        torch.save({"input_ids": probe["doc_input_ids"], "attention_mask": probe["doc_attention_mask"], "embeddings": emb},
                   out / "probe_embeddings.pt")
    D.barrier()
    return export_dir

