"""The losses, as pure functions of embeddings (fp32) and batch structure. No process groups in here: the
caller passes candidates already gathered across ranks (modeling/distributed.py).

Normalisation is per query in both losses (InfoNCE: mean over queries; RankNet: mean over a query's pairs, then
mean over queries), so with equal per-rank batches the average of the ranks' losses is the global batch loss, the
data-parallel gradient average is the exact global gradient, and the InfoNCE/RankNet balance does not depend on the
number of devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class InfoNCEOut:
    loss: torch.Tensor
    accuracy: torch.Tensor  # share of queries whose positive scores highest
    masked: torch.Tensor  # candidates removed from denominators (duplicates of the positive, margin)


def info_nce(
    q: torch.Tensor,
    docs: torch.Tensor,
    pos_index: torch.Tensor,
    *,
    temperature: float,
    valid: torch.Tensor | None = None,
    doc_hash: torch.Tensor | None = None,
    margin: float | None = None,
) -> InfoNCEOut:
    """q [B, D] against every candidate docs [N, D]; pos_index [B] indexes each query's positive in docs.

    valid [N]: candidates that exist (padding excluded from every denominator). doc_hash [N]: a candidate with the
    positive's content hash (other than the positive itself) is a false negative and is masked out. margin: also
    mask candidates scoring above s_pos + margin (likely unlabeled positives)."""
    scores = q.float() @ docs.float().T  # cosine: embeddings are L2-normalised
    b = torch.arange(q.shape[0], device=q.device)
    s_pos = scores[b, pos_index]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if valid is not None:
        mask |= ~valid.bool().unsqueeze(0)
    if doc_hash is not None:
        mask |= doc_hash.unsqueeze(0) == doc_hash[pos_index].unsqueeze(1)
    if margin is not None:
        mask |= scores > (s_pos.unsqueeze(1) + margin)
    mask[b, pos_index] = False
    logits = (scores / temperature).masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, pos_index)
    acc = (logits.argmax(1) == pos_index).float().mean()
    masked = mask.sum() - (0 if valid is None else (~valid.bool()).sum() * q.shape[0])
    return InfoNCEOut(loss, acc.detach(), masked.detach())


def ranknet(
    prompt: torch.Tensor,
    cands: torch.Tensor,
    ranking: torch.Tensor,
    cand_mask: torch.Tensor,
    *,
    scale: float,
    pair_weighting: str = "none",
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """RankNet over every ordered pair of a slate: prompt [B, D], cands [B, K, D], ranking [B, K] (candidate indices,
    teacher's best first, -1 padding), cand_mask [B, K]. Logits = scale * cos. For each pair (i better than j):
    log(1 + exp(-(s_i - s_j))); mean over a query's pairs, then over queries.

    levels [B, K] (optional): each candidate's preference level (0 = best); i beats j iff level_i < level_j, so
    graded slates (qrels) add no pair between equal grades. Without it the level is the rank in `ranking`."""
    s = scale * torch.einsum("bd,bkd->bk", prompt.float(), cands.float())
    k = cands.shape[1]
    # rank position of every candidate (0 = best); padding gets k (worse than all, but masked below)
    if levels is not None:
        pos = levels
    else:
        pos = torch.full_like(ranking, k)
        rows = torch.arange(ranking.shape[0], device=ranking.device).unsqueeze(1).expand_as(ranking)
        valid_r = ranking >= 0
        pos[rows[valid_r], ranking[valid_r]] = torch.arange(k, device=ranking.device).expand_as(ranking)[valid_r]
    better = pos.unsqueeze(2) < pos.unsqueeze(1)  # [B, i, j]: i ranked above j
    pair = better & cand_mask.unsqueeze(2) & cand_mask.unsqueeze(1)
    diff = s.unsqueeze(2) - s.unsqueeze(1)
    losses = F.softplus(-diff)  # = BCEWithLogits(s_i - s_j, 1)
    w = pair.float()
    n_pairs = w.sum((1, 2)).clamp(min=1)
    if pair_weighting == "rank_sum":
        w = w / (pos.unsqueeze(2) + pos.unsqueeze(1) + 2).float()
    # divided by the pair count, weighted or not, as the official rank_net(weighted=True) (BCEWithLogits with a
    # weight, mean over pairs): weights scale the loss down (~1/14 at K=16) rather than being renormalised
    per_query = (losses * w).sum((1, 2)) / n_pairs
    return per_query.mean()
