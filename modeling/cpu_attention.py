"""sdpa for training a bf16 decoder on a CPU: short sequences attend in fp32.

torch's CPU flash-attention kernel, which sdpa picks for bf16, has a slow backward for short sequences: on an AMX
Xeon (SmolLM2 shape: 9 query / 3 KV heads of 64, causal, one thread; bench/results/attention-cpu.json) its forward +
backward took 52 ms for 32 x 64 tokens and 61 ms for 16 x 128, against 25 and 33 ms when q/k/v are cast to fp32
first (the fp32 kernel; gradients also closer to fp64's); 0.95x at 8 x 192, and from 256 tokens bf16 is faster
(1.04x at 8 x 256, 1.19x at 4 x 512); `bench/attention_cpu.py` measures it. So in training mode, on the CPU, for
bf16 inputs of at most `max_len` tokens, this casts q/k/v to fp32 around transformers' own sdpa and the output back;
everything else (evaluation, long sequences, fp32 models, GPUs) is transformers' sdpa unchanged. Masks are built
exactly as for sdpa.
"""

from __future__ import annotations

from functools import cache

import torch

NAME = "e2rank_sdpa_cpu"
MAX_LEN = 192  # the crossover measured above: fp32 wins up to 192 tokens, bf16 from 256 (one thread)
ATTR = "fp32_attention_max_len"  # set on a model's attention modules by `set_max_len`; MAX_LEN when absent


def upcast(module: torch.nn.Module, query: torch.Tensor, length: int | None = None) -> bool:
    """Whether this attention call should run in fp32 (the rule in the module docstring); `length` is the longest
    sequence (default: the query's length; a packed row passes its longest sequence)."""
    length = query.shape[-2] if length is None else length
    return (module.training and query.device.type == "cpu" and query.dtype == torch.bfloat16
            and length <= getattr(module, ATTR, MAX_LEN))


def sdpa_fp32_short(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not upcast(module, query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


@cache
def register() -> str:
    """Make NAME a transformers attention implementation, with sdpa's masks (idempotent). Returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_fp32_short)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def set_max_len(model: torch.nn.Module, max_len: int) -> int:
    """Set the length limit on every attention module that has a `scaling` (Llama/Qwen3 attention); returns how
    many. The packed attention (modeling/packing.py) reads the same limit; 0 = never (the trainer's config checks
    the value at start)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "scaling") and hasattr(m, "is_causal"):
            setattr(m, ATTR, max_len)
            n += 1
    return n
