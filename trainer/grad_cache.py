"""GradCache: a contrastive step whose batch is bounded by the loss, not by activation memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (arXiv 2101.06983):
1. embed every chunk of the micro-batch without a graph (remembering the RNG state before each chunk);
2. compute the loss on those embeddings (gathered across ranks, as in the plain step) and its gradient with respect
   to every local embedding; the gather's backward sums what the other ranks' losses send back;
3. re-encode chunk by chunk with the graph, the RNG state replayed (dropout matches), and backpropagate the cached
   embedding gradients through `backward(surrogate, last)`, the trainer's DeepSpeed backward.
The parameter gradient equals the un-cached step's (tests/trainer/test_grad_equivalence.py, ZeRO-3 on 2 ranks);
activations held at any time are one chunk's. Every rank runs the same forwards and backwards (chunk counts agreed
across ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modeling.chunking import ChunkStats, chunk_view, packs, pad_multiple, plan_synced
from modeling.profiling import phase

from .config import LossConfig
from .objective import Encode, fields, loss_terms

Backward = Callable[[torch.Tensor, bool], None]


def _rng_state() -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(s: tuple) -> None:
    torch.set_rng_state(s[0])
    if s[1] is not None:
        torch.cuda.set_rng_state(s[1])


class CachedStep:
    def __init__(self, encode: Encode, chunk_tokens: int, multiple: int | None = None, min_efficiency: float = 0.95):
        if chunk_tokens <= 0:
            raise ValueError("GradCache needs a chunk size: encode.chunk_tokens > 0")
        self.encode, self.chunk_tokens, self.multiple = encode, chunk_tokens, multiple
        self.min_efficiency = min_efficiency
        self._pending: dict[str, Any] | None = None

    def forward(self, batch: dict[str, Any], stage: int, cfg: LossConfig,
                stats: ChunkStats | None = None) -> dict[str, torch.Tensor]:
        """Loss terms on graph-free embeddings; `backward` must follow (on every rank) before the next forward."""
        work = []
        emb: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for f in fields(stage):
                ids, mask = batch[f"{f}_input_ids"], batch[f"{f}_attention_mask"]
                multiple = self.multiple or pad_multiple(ids)
                parts, order = [], []
                packed = packs(self.encode)
                for idx in plan_synced(mask, self.chunk_tokens, multiple, min_efficiency=self.min_efficiency,
                                       packed=packed):
                    cids, cmask = chunk_view(ids, mask, idx, multiple)
                    rng = _rng_state()
                    parts.append(self.encode(cids, cmask))
                    order.append(idx)
                    work.append((f, idx, cids, cmask, rng))
                    if stats is not None:
                        stats.add(f, cmask, packed)
                cat = torch.cat(parts)
                out = torch.empty_like(cat)
                out[torch.as_tensor([i for o in order for i in o], device=cat.device)] = cat
                emb[f] = out.requires_grad_()
        after = _rng_state()
        with phase("loss"):
            terms = loss_terms(emb, batch, stage, cfg)
        self._pending = {"emb": emb, "work": work, "after": after, "loss": terms["loss"]}
        return terms

    def backward(self, backward: Backward) -> None:
        p, self._pending = self._pending, None
        if p is None:
            raise RuntimeError("CachedStep.backward without a forward")
        leaves = list(p["emb"].values())
        with phase("loss"):
            grads = dict(zip(p["emb"], torch.autograd.grad(p["loss"], leaves)))
        for n, (f, idx, cids, cmask, rng) in enumerate(p["work"]):
            _set_rng_state(rng)
            e = self.encode(cids, cmask)
            g = grads[f].index_select(0, torch.as_tensor(idx, device=e.device))
            backward((e * g).sum(), n == len(p["work"]) - 1)
        _set_rng_state(p["after"])  # the RNG stream continues as after the un-cached forward

    def discard(self) -> None:
        """A skipped micro-batch (non-finite loss on some rank): drop the cache, backpropagate nothing."""
        self._pending = None
