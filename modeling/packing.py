"""Packed forwards for causal decoders: the sequences of a chunk are concatenated into one row with no padding,
position ids restart at 0 for every sequence (RoPE sees each as if alone), attention is block-diagonal causal, and
each sequence is pooled at its own last token.

The attention is a function registered with transformers' AttentionInterface under NAME; the model receives the
sequence boundaries as `cu_seq_lens_q/k` and `max_length_q/k`, which transformers forwards to it, and builds no
mask for an implementation it does not know (masking_utils._preprocess_mask_arguments). Kernels, best first:
- flash-attn's `flash_attn_varlen_func` (CUDA, bf16/fp16, when the package is installed);
- `torch.nn.attention.varlen.varlen_attn` (CUDA, bf16/fp16: the FlashAttention-2 kernel inside torch);
- sdpa per sequence (anything else, the CPU included: exact, one causal sdpa call per sequence and layer).
`kernel_name()` says which one runs on a device; the trainer prints and logs it.
"""

from __future__ import annotations

import inspect
import logging
from functools import cache

import torch
import torch.nn.functional as F

from .cpu_attention import upcast

log = logging.getLogger(__name__)

NAME = "e2rank_varlen"


@cache
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        return None


@cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    params = inspect.signature(varlen_attn).parameters
    # causal is window_size=(-1, 0) since pytorch#172245 (is_causal before); GQA arrived later (pytorch#179468)
    if "window_size" not in params and "is_causal" not in params:
        return None, False
    return varlen_attn, "enable_gqa" in params


def kernel_name(device: torch.device | str, dtype: torch.dtype) -> str:
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if _flash_attn() is not None:
            return "flash_attn.flash_attn_varlen_func"
        if _torch_varlen()[0] is not None:
            return "torch.nn.attention.varlen.varlen_attn"
    return "sdpa per sequence"


def _per_sequence(q, k, v, cu: list[int], scale, dropout: float) -> torch.Tensor:
    """q [H, T, D], k/v [Hkv, T, D] -> [T, H, D]."""
    gqa = q.shape[0] != k.shape[0]
    out = [F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True, scale=scale,
                                          dropout_p=dropout, enable_gqa=gqa) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(out, dim=1).transpose(0, 1)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D],
    None). The boundaries come in kwargs (`cu_seq_lens_q`, `max_length_q`)."""
    cu, mx = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        raise ValueError(
            f"attention {NAME!r} needs packed inputs (cu_seq_lens_q): call modeling.embedding.embed, which "
            "packs, rather than the backbone directly"
        )
    if query.shape[0] != 1:
        raise ValueError(f"attention {NAME!r} takes one packed row, got a batch of {query.shape[0]}")
    dropout = dropout if module.training else 0.0
    q, k, v = query[0], key[0], value[0]
    kname = kernel_name(q.device, q.dtype)
    if kname.startswith("flash_attn"):
        out = _flash_attn()(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            cu,
            cu,
            mx,
            mx,
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=True,
        )
    elif kname.startswith("torch"):
        fn, gqa = _torch_varlen()
        if q.shape[0] != k.shape[0] and not gqa:  # an older torch: repeat the KV heads
            rep = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            gqa = False
        extra = {"enable_gqa": True} if gqa and q.shape[0] != k.shape[0] else {}
        causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(fn).parameters else {"is_causal": True}
        out = fn(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, cu, mx, mx, scale=scaling, **causal, **extra
        )
    elif upcast(module, q, int(mx)):  # the CPU's bf16 flash backward is slow on short sequences (cpu_attention.py)
        out = _per_sequence(q.float(), k.float(), v.float(), cu.tolist(), scaling, dropout).to(q.dtype)
    else:
        out = _per_sequence(q, k, v, cu.tolist(), scaling, dropout)
    return out.unsqueeze(0), None


@cache
def register() -> str:
    """Make NAME a transformers attention implementation (idempotent). Returns NAME."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def is_packed(backbone: torch.nn.Module) -> bool:
    return getattr(getattr(backbone, "config", None), "_attn_implementation", None) == NAME


def pack(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A padded batch (any padding side) -> (input_ids [1, T], position_ids [1, T], cu_seqlens [N+1] int32, max
    length), T = its real tokens, in row order."""
    m = mask.bool()
    lengths = m.sum(1)
    flat = ids[m]  # row-major: each row's real tokens in order, whatever side its padding was on
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)
    pos = torch.arange(flat.numel(), device=ids.device) - starts
    return flat.unsqueeze(0), pos.unsqueeze(0), cu, int(lengths.max())


def pool_packed(hidden: torch.Tensor, cu: torch.Tensor, mode: str) -> torch.Tensor:
    """[T, D] packed hidden states -> [N, D] per sequence (last token, mean or first)."""
    cu = cu.long()
    if mode == "last":
        return hidden.index_select(0, cu[1:] - 1)
    if mode == "cls":
        return hidden.index_select(0, cu[:-1])
    if mode == "mean":
        lengths = cu[1:] - cu[:-1]
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        out = torch.zeros(len(lengths), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        return out.index_add_(0, seg, hidden) / lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}")


def packed_hidden(
    backbone: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed forward: ([T, D] hidden states, cu_seqlens)."""
    flat, pos, cu, mx = pack(ids, mask)
    out = backbone(
        input_ids=flat, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx, max_length_k=mx,
        use_cache=False,  # as modeling/embedding.py embed
    )
    return out.last_hidden_state[0], cu
