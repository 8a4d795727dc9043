"""How text becomes an embedding, for training, evaluation and export alike: left-padded token batches, one
backbone forward, one pooling function, L2 normalisation in fp32.

`pool` is the only pooling implementation and `embed` the only embedding path; the trainer's encoder, the Reranker
and the export checks all call them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .packing import is_packed, packed_hidden, pool_packed


def left_pad(seqs: list[np.ndarray], pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so the last position holds each sequence's pooling token (last-token pooling)."""
    n = max(len(s) for s in seqs)
    n = -(-n // multiple) * multiple
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s) :] = torch.from_numpy(s.astype(np.int64))
            mask[i, n - len(s) :] = 1
    return ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[N, L, D] hidden states + [N, L] attention mask -> [N, D] (not normalised).

    last: the hidden state of each sequence's last real token, for left or right padding alike.
    mean: average over real tokens. cls: the first real token."""
    if mode == "last":
        if bool((mask[:, -1] == 1).all()):  # left padding (our loader): the last position, no gather
            return hidden[:, -1]
        idx = mask.long().cumsum(1).argmax(1)  # position of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "cls":
        idx = (mask == 0).long().sum(1) * (mask[:, 0] == 0).long()  # first real token under left padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown pooling {mode!r}")


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.causal = is_causal(backbone)
        self.packed = self.causal and is_packed(backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, input_ids, attention_mask, self.pooling, causal=self.causal)


def is_causal(backbone: nn.Module) -> bool:
    """A decoder whose attention is causal (Llama/Qwen attention modules say so); encoders (BERT) are not."""
    flags = [m.is_causal for m in backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def to_right_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens first (in order), padding after, whatever the padding side was."""
    if bool((mask[:, 0] == 1).all()):
        return ids, mask
    order = torch.argsort(1 - mask.to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so an embedding does not depend on how much padding precedes it
    (HF forwards default to arange(L), which shifts left-padded text; absolute-position encoders would drift)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def embed(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
          causal: bool | None = None) -> torch.Tensor:
    """The one way text becomes an embedding: backbone -> pool -> L2 normalise, in fp32.

    Causal decoders run right-padded with no attention mask: a real token only attends to earlier tokens, all real,
    so its hidden state is exactly the masked one, and attention takes the fused causal kernels (flash on GPU). A
    padding mask would instead force sdpa off flash (mask + GQA: the slow math path on CUDA), and left padding gives
    pad rows with nothing to attend to, whose NaN outputs poison the weight gradients (0 x NaN) on CUDA kernels."""
    if causal is None:
        causal = is_causal(backbone)
    if causal and is_packed(backbone):  # one row, no padding, block-diagonal causal attention (modeling/packing.py)
        hidden, cu = packed_hidden(backbone, input_ids, attention_mask)
        return F.normalize(pool_packed(hidden, cu, pooling).float(), dim=-1)
    if causal:
        input_ids, attention_mask = to_right_padding(input_ids, attention_mask)
        # no KV cache: an embedding needs none, and transformers' DynamicCache (on by default) copies every layer's
        # keys and values and, under torch.compile, recompiles each layer on its cache state (model.compile)
        out = backbone(input_ids=input_ids, use_cache=False)
    else:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    emb = pool(out.last_hidden_state, attention_mask, pooling)
    return F.normalize(emb.float(), dim=-1)  # similarities and losses in fp32, whatever the model dtype


def native_bf16(cuda: bool) -> bool:
    """Whether this device multiplies bf16 natively: GPUs, and CPUs with AMX or AVX512-BF16. Elsewhere bf16 is
    emulated and slow: on an AVX2-only AMD EPYC, a 1024^3 bf16 matmul ran at 0.9 GFLOP/s vs 57 in fp32 (1 thread),
    and a SmolLM2 forward + backward 10x slower than fp32."""
    if cuda:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
