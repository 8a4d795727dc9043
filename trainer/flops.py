"""Model FLOPs of a training step, the numerator of MFU (one formula for our trainer and the peers we compare with).

Per real token, forward + backward: 6 x the matmul parameters (Kaplan et al. 2020; the input embedding is a lookup
and not counted, as in nanoGPT). Attention adds, per sequence of l real tokens and per layer, 2 matmuls (QK^T and
AV) of l x l x d_attn multiply-adds forward, x3 with the backward: 12 l^2 d_attn, halved for causal attention, which
computes only the lower triangle (PaLM, Chowdhery et al. 2022, appendix B, counts the full square). Recomputation
(GradCache's second forward, activation checkpointing) is not useful work and is not counted.
"""

from __future__ import annotations

import time

import torch


def step_flops(matmul_params: int, real_tokens: float, sum_sq_lengths: float, layers: int, attn_dim: int,
               causal: bool) -> float:
    attention = 12 * layers * attn_dim * sum_sq_lengths * (0.5 if causal else 1.0)
    return 6 * matmul_params * real_tokens + attention


def attention_shape(config) -> tuple[int, int]:
    """(layers, attention width = heads x head dim) of a Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


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
