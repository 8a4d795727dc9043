"""Padding-free encoding: a padded [N, L] batch is encoded in length-grouped chunks, each padded only to its own
longest sequence, and the embeddings come back in the batch's order. The loss then sees exactly the embeddings (and
gradients) of the padded batch, to round-off, while the backbone computes on far fewer pad tokens.

Under ZeRO-3 every forward gathers parameters with collectives, so every rank must run the same number of forwards:
the chunk count of each field is agreed across ranks (the largest local count wins; the others split further).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import distributed as D
from .profiling import phase

Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def assign_chunks(costs, world: int) -> list[list[int]]:
    """Chunk indices per rank, balanced by cost (padded tokens): largest first, each to the least-loaded rank (ties:
    lowest rank). Deterministic, so every rank computes the same split without communicating."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(j)
        load[r] += costs[j]
    return out


def plan_chunks(lengths, budget: int, multiple: int = 8, n_chunks: int | None = None,
                min_efficiency: float = 0.95, packed: bool = False) -> list[np.ndarray]:
    """Indices of each chunk, longest sequences first. Greedy: a chunk grows while (count x its padded max length)
    stays within `budget` tokens and its real/padded tokens stay >= `min_efficiency` (a sequence longer than the
    budget gets a chunk of its own). An extra forward is not free: in training each one adds a weight gradient per
    parameter (and its accumulation), which on a CPU outweighed a quarter more padding (trainer/config.py). With
    `n_chunks` (>= the greedy count, <= len(lengths)), the chunk holding the most padded tokens is halved until there
    are exactly n_chunks.
    budget <= 0: a single chunk. packed: a chunk becomes one unpadded row (modeling/packing.py), so it costs its real
    tokens and has no padding to bound."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    chunks: list[list[int]] = []
    if budget <= 0:
        chunks = [list(order)]
    else:
        cur: list[int] = []
        real = 0
        for i in order:
            n = int(lengths[i])
            if cur and packed:
                if real + n > budget:
                    chunks.append(cur)
                    cur, real = [], 0
            elif cur:
                width = _padded(int(lengths[cur[0]]), multiple)
                if (len(cur) + 1) * width > budget or (real + n) < min_efficiency * (len(cur) + 1) * width:
                    chunks.append(cur)
                    cur, real = [], 0
            cur.append(int(i))
            real += n
        chunks.append(cur)
    if n_chunks is not None:
        if not len(chunks) <= n_chunks <= len(lengths):
            raise ValueError(f"cannot cut {len(lengths)} sequences into {n_chunks} chunks (greedy: {len(chunks)})")
        while len(chunks) < n_chunks:
            cost = [(int(lengths[c].sum()) if packed else len(c) * _padded(int(lengths[c[0]]), multiple))
                    if len(c) > 1 else -1 for c in chunks]
            j = int(np.argmax(cost))
            c = chunks.pop(j)
            h = len(c) // 2
            chunks[j:j] = [c[:h], c[h:]]
    return [np.asarray(c, dtype=np.int64) for c in chunks]


def chunk_view(ids: torch.Tensor, mask: torch.Tensor, idx: np.ndarray, multiple: int = 8):
    """Rows `idx` of a padded batch, trimmed to the chunk's own longest sequence (pad columns only are dropped)."""
    t = torch.as_tensor(idx, device=ids.device)
    ids, mask = ids.index_select(0, t), mask.index_select(0, t)
    width = min(_padded(int(mask.sum(1).max()), multiple), ids.shape[1])
    if bool((mask[:, -1] == 1).all()):  # left padding (our loader, last-token pooling)
        return ids[:, ids.shape[1] - width :], mask[:, mask.shape[1] - width :]
    if bool((mask[:, 0] == 1).all()):  # right padding
        return ids[:, :width], mask[:, :width]
    return ids, mask  # mixed padding: keep the batch's width (still correct, just not trimmed)


@dataclass
class ChunkStats:
    """Tokens the backbone actually computed on: real and padded, and the number of forwards."""

    real: int = 0
    padded: int = 0
    forwards: int = 0
    sum_sq: int = 0  # sum of squared real lengths (attention FLOPs)
    per_field: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, mask: torch.Tensor, packed: bool = False) -> None:
        lengths = mask.sum(1)
        r = int(lengths.sum())
        p = r if packed else mask.numel()
        self.sum_sq += int((lengths.long() ** 2).sum())
        self.real += r
        self.padded += p
        self.forwards += 1
        f = self.per_field.setdefault(name, [0, 0])
        f[0] += r
        f[1] += p

    @property
    def efficiency(self) -> float:
        return self.real / max(self.padded, 1)


def pad_multiple(t: torch.Tensor) -> int:
    """Chunk widths are rounded to 8 on GPUs (tensor-core tiles); on CPUs rounding only adds padding."""
    return 8 if t.is_cuda else 1


def plan_synced(mask: torch.Tensor, budget: int, multiple: int = 8, sync: bool = True,
                min_efficiency: float = 0.95, packed: bool = False) -> list[np.ndarray]:
    """plan_chunks with the chunk count agreed across ranks (same number of forwards everywhere)."""
    with phase("chunk_plan"):
        lengths = mask.sum(1).cpu().numpy()
        n = len(plan_chunks(lengths, budget, multiple, min_efficiency=min_efficiency, packed=packed))
        if sync:
            n = D.max_across(n)
        return plan_chunks(lengths, budget, multiple, n_chunks=n, min_efficiency=min_efficiency, packed=packed)


def packs(encode) -> bool:
    """Whether an encoder (an Encoder, or a DeepSpeed engine around one) runs packed forwards."""
    return bool(getattr(getattr(encode, "module", encode), "packed", False))


def encode_chunked(encode: Encode, ids: torch.Tensor, mask: torch.Tensor, budget: int, *, name: str = "",
                   stats: ChunkStats | None = None, multiple: int | None = None, sync: bool = True,
                   min_efficiency: float = 0.95) -> torch.Tensor:
    """Embeddings [N, D] of a padded batch, in its order, computed chunk by chunk (with the autograd graph if on)."""
    multiple = multiple or pad_multiple(ids)
    packed = packs(encode)
    chunks = plan_synced(mask, budget, multiple, sync, min_efficiency, packed)
    parts, order = [], []
    for idx in chunks:
        cids, cmask = chunk_view(ids, mask, idx, multiple)
        parts.append(encode(cids, cmask))
        order.append(torch.as_tensor(idx, device=parts[-1].device))
        if stats is not None:
            stats.add(name, cmask, packed)
    emb = torch.cat(parts)
    inv = torch.empty_like(torch.cat(order))
    inv[torch.cat(order)] = torch.arange(len(inv), device=inv.device)
    return emb.index_select(0, inv)
