"""A step's metrics and log line (nanoGPT's: loss, throughput, MFU), and when they are written."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from modeling import distributed as D

from .flops import step_flops


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


def peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """MFU counts real tokens only (padding is not useful work): trainer/flops.py per rank, over this rank's measured
    matmul peak in the training dtype with the threads it trains with."""

    def __init__(self, *, log_every: int, world: int, flop_params: int, attn_shape: tuple[int, int], causal: bool,
                 peak_flops: float, device: torch.device):
        self.log_every, self.world, self.device = log_every, world, device
        self.flop_params, self.attn_shape, self.causal, self.peak = flop_params, attn_shape, causal, peak_flops
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def should_log(self, step: int, last: int) -> bool:
        return step % self.log_every == 0 or step == last

    def compute(self, out: dict[str, Any], dt: float, *, grad_norm: float, skipped: int, loader) -> dict[str, float]:
        """The step's metrics from train_step's output (called on every rank: it averages across ranks)."""
        s, st = out["sums"], out["stats"]
        real, padded, sq = (D.mean_across(torch.tensor([float(st.real), float(st.padded), float(st.sum_sq)]))
                            * self.world).tolist()
        flops = step_flops(self.flop_params, real, sq, *self.attn_shape, causal=self.causal)
        padded_flops = step_flops(self.flop_params, padded, sq, *self.attn_shape, causal=self.causal)
        m = {
            "loss": s["loss"], "infonce": s["infonce"], "accuracy": s["accuracy"],
            "masked_negatives": s["masked_negatives"], "lr": out["lr"], "grad_norm": grad_norm, "step_time_s": dt,
            "samples_per_s": out["samples"] * self.world / dt, "tokens_per_s": real / dt,
            "mfu": flops / self.world / dt / self.peak,
            "padded_mfu": padded_flops / self.world / dt / self.peak,
            "peak_mem_gb": peak_mem_gb(self.device), "skipped_micro_batches": skipped,
            "padding_efficiency": real / max(padded, 1), "loader_padding_efficiency": loader.padding_efficiency,
            "forwards": st.forwards, "epoch": loader.epoch,
        }
        if "ranknet" in s:
            m["ranknet"] = s["ranknet"]
        if self.device.type == "cpu":  # pages faulted in since the last step's metrics: memory not reused by malloc
            faults, self.faults = self.faults, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            m["page_faults"] = self.faults - faults
        m.update({f"time_{k}_s": v for k, v in out.get("phases", {}).items()})
        return m

    @staticmethod
    def line(step: int, max_steps: int, m: dict[str, float]) -> str:
        return (
            f"[train] step {step}/{max_steps} | loss {m['loss']:.4f} (infonce {m['infonce']:.4f}"
            + (f" ranknet {m['ranknet']:.4f}" if "ranknet" in m else "")
            + f") | acc {m['accuracy']:.2f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | "
            f"{m['samples_per_s']:.1f} samples/s {m['tokens_per_s']:.0f} tok/s | {m['step_time_s']:.2f}s | "
            f"mfu {m['mfu']:.1%} | pad-eff {m['padding_efficiency']:.2f} | mem {m['peak_mem_gb']:.2f}GB | "
            + " ".join(f"{k[5:-2]} {v:.2f}s" for k, v in m.items() if k.startswith("time_"))
            + (f" | page faults {m['page_faults'] / 1e3:.0f}k" if "page_faults" in m else "")
        )
