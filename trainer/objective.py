"""One micro-batch -> embeddings -> loss terms, for both stages. Used by the trainer and the gradient-equivalence test.

Each rank encodes its local queries, documents (and, in stage 2, listwise prompts), each field in length-grouped
chunks (modeling/chunking.py) whose count is agreed across ranks: the same forwards on every rank, every step
(ZeRO-3 hangs otherwise). Candidates are gathered across ranks with an autograd-aware all_gather, so each local
query is scored against every candidate in the global batch.

`embed_batch` and `loss_terms` are separate so GradCache (trainer/grad_cache.py) can compute the loss on cached
embeddings and re-encode with the graph afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modeling import distributed as D
from modeling.chunking import ChunkStats, encode_chunked
from modeling.profiling import phase

from .config import LossConfig
from .losses import info_nce, ranknet

Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fields(stage: int) -> tuple[str, ...]:
    return ("query", "doc") if stage == 1 else ("query", "doc", "prompt")


def embed_batch(encode: Encode, batch: dict[str, Any], stage: int, chunk_tokens: int = 0,
                stats: ChunkStats | None = None, min_efficiency: float = 0.95) -> dict[str, torch.Tensor]:
    """{field: [N, D] fp32 embeddings} in batch order; chunk_tokens <= 0 encodes each field as one padded batch."""
    return {f: encode_chunked(encode, batch[f"{f}_input_ids"], batch[f"{f}_attention_mask"], chunk_tokens, name=f,
                              stats=stats, min_efficiency=min_efficiency) for f in fields(stage)}


def loss_terms(
    emb: dict[str, torch.Tensor], batch: dict[str, Any], stage: int, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    q, d = emb["query"], emb["doc"]
    across = cfg.negatives_across_ranks(stage)
    gather_grad, gather = (D.gather_with_grad, D.gather_no_grad) if across else (lambda t: t, lambda t: t)
    rank = D.world()[0] if across else 0  # where this rank's candidates start in the scored set
    b, g = q.shape[0], batch["docs_per_query"]
    local = torch.arange(b, device=q.device)
    if stage == 1:
        pos = (rank * b + local) * g  # positive first in each query's group
        valid = None
    else:
        top1 = batch["ranking"][:, 0].to(q.device)  # InfoNCE positive in stage 2: the teacher's top-1
        pos = (rank * b + local) * g + top1
        valid = gather(batch["cand_mask"].reshape(-1).to(q.device))
    docs_all = gather_grad(d)
    hashes = gather(batch["doc_hash"].to(q.device)) if cfg.mask_false_negatives else None
    nce = info_nce(q, docs_all, pos, temperature=cfg.temperature, valid=valid, doc_hash=hashes, margin=cfg.margin_mask)
    out = {"infonce": nce.loss, "accuracy": nce.accuracy, "masked_negatives": nce.masked.float()}
    if stage == 2:
        rk = ranknet(
            emb["prompt"],
            d.view(b, g, -1),
            batch["ranking"].to(q.device),
            batch["cand_mask"].to(q.device),
            scale=cfg.ranknet_scale,
            pair_weighting=cfg.ranknet_pair_weighting,
            levels=batch["levels"].to(q.device) if "levels" in batch else None,
        )
        out["ranknet"] = rk
        out["loss"] = nce.loss + cfg.ranknet_weight * rk
    else:
        out["loss"] = nce.loss
    return out


def compute(
    encode: Encode,
    batch: dict[str, Any],
    stage: int,
    cfg: LossConfig,
    chunk_tokens: int = 0,
    stats: ChunkStats | None = None,
    min_efficiency: float = 0.95,
) -> dict[str, torch.Tensor]:
    emb = embed_batch(encode, batch, stage, chunk_tokens, stats, min_efficiency)
    with phase("loss"):
        return loss_terms(emb, batch, stage, cfg)
