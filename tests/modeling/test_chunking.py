"""Padding-free encoding and GradCache in one process: plans, embeddings and gradients equal the padded batch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from modeling.chunking import ChunkStats, chunk_view, encode_chunked, plan_chunks
from modeling.embedding import Encoder
from tests.trainer.test_grad_equivalence import global_batch
from tests.trainer_fixtures import make_tiny_model
from trainer.config import LossConfig
from trainer.grad_cache import CachedStep
from trainer.objective import compute


def test_plan_covers_every_sequence_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 200)
    chunks = plan_chunks(lengths, budget=2048, multiple=8)
    flat = np.concatenate(chunks)
    assert sorted(flat.tolist()) == list(range(200))
    for c in chunks:
        width = -(-int(lengths[c].max()) // 8) * 8
        assert len(c) == 1 or len(c) * width <= 2048
        assert len(c) == 1 or lengths[c].sum() >= 0.95 * len(c) * width  # the efficiency floor holds per chunk
    assert lengths[flat].tolist() == sorted(lengths.tolist(), reverse=True)  # longest first
    real = lengths.sum()
    padded = sum(len(c) * (-(-int(lengths[c].max()) // 8) * 8) for c in chunks)
    whole = len(lengths) * (-(-int(lengths.max()) // 8) * 8)
    assert real / padded > 0.95 > 0.6 > real / whole  # the padded batch wastes most of its tokens; the chunks do not


def test_a_lower_efficiency_floor_gives_fewer_wider_chunks():
    lengths = np.random.default_rng(1).integers(20, 257, 128)  # a stage-1 batch of documents, <= 256 tokens
    tight, loose = (plan_chunks(lengths, budget=65536, multiple=8, min_efficiency=e) for e in (0.95, 0.5))
    assert len(loose) < len(tight) and len(loose) <= 3
    for chunks in (tight, loose):
        assert sorted(np.concatenate(chunks).tolist()) == list(range(128))


def test_plan_to_an_exact_chunk_count_and_refusals():
    lengths = [5, 300, 7, 290, 6, 8]
    greedy = plan_chunks(lengths, budget=1024, min_efficiency=0.0)
    assert len(greedy) == 2  # the two long ones, then the four short ones
    floor = plan_chunks(lengths, budget=1024, multiple=1)  # 300+290 (590/600); 8+7 would be 15/16 < 0.95
    assert [sorted(lengths[i] for i in c) for c in floor] == [[290, 300], [8], [7], [6], [5]]
    five = plan_chunks(lengths, budget=1024, n_chunks=5, min_efficiency=0.0)
    assert len(five) == 5 and sorted(np.concatenate(five).tolist()) == list(range(6))
    assert len(plan_chunks(lengths, budget=0)) == 1
    assert [c.tolist() for c in plan_chunks([700], budget=64)] == [[0]]  # longer than the budget: its own chunk
    with pytest.raises(ValueError, match="cannot cut"):
        plan_chunks(lengths, budget=1024, n_chunks=7)
    with pytest.raises(ValueError, match="cannot cut"):
        plan_chunks(lengths, budget=64, n_chunks=2)
    assert plan_chunks([], budget=64) == []


def test_chunk_view_drops_only_padding():
    ids = torch.tensor([[0, 0, 0, 0, 5, 6], [0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 0, 9]])
    mask = (ids > 0).long()
    cids, cmask = chunk_view(ids, mask, np.array([0, 2]), multiple=1)
    assert cids.tolist() == [[5, 6], [0, 9]] and cmask.tolist() == [[1, 1], [0, 1]]
    right = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    rids, _ = chunk_view(right, (right > 0).long(), np.array([0, 1]), multiple=1)
    assert rids.tolist() == [[5, 6], [7, 0]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    return lambda: Encoder(AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32), "last")


def _grads(enc):
    return {n: p.grad.detach().clone() for n, p in enc.named_parameters()}


def _close(a, b, tol=1e-5):
    for n in a:
        rel = (a[n] - b[n]).abs().max().item() / (b[n].abs().max().item() + 1e-12)
        assert rel < tol, f"{n}: {rel:.2e}"


@pytest.mark.parametrize("stage", [1, 2])
def test_chunked_and_cached_equal_the_padded_batch(tiny, stage):
    batch = global_batch(stage, b=4, g=3)
    ref_enc = tiny()
    ref = compute(ref_enc, batch, stage, LossConfig())
    ref["loss"].backward()
    ref_g = _grads(ref_enc)

    enc = tiny()
    stats = ChunkStats()
    got = compute(enc, batch, stage, LossConfig(), chunk_tokens=16, stats=stats)
    got["loss"].backward()
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    _close(_grads(enc), ref_g)
    n = sum(batch[f"{f}_attention_mask"].shape[0] for f in ("query", "doc", "prompt") if f"{f}_input_ids" in batch)
    assert stats.forwards > 3 and stats.forwards <= n
    padded = sum(batch[f"{f}_input_ids"].numel() for f in ("query", "doc", "prompt") if f"{f}_input_ids" in batch)
    assert stats.padded < padded and stats.real == sum(
        int(batch[f"{f}_attention_mask"].sum()) for f in ("query", "doc", "prompt") if f"{f}_input_ids" in batch)

    enc = tiny()  # a low efficiency floor changes the chunks, never the result
    loose = compute(enc, batch, stage, LossConfig(), chunk_tokens=64, min_efficiency=0.3)
    loose["loss"].backward()
    assert loose["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    _close(_grads(enc), ref_g)

    enc = tiny()
    step = CachedStep(enc, chunk_tokens=16)
    terms = step.forward(batch, stage, LossConfig())
    assert not any(p.grad is not None for p in enc.parameters())  # nothing backpropagated yet
    calls = []
    step.backward(lambda s, last: (calls.append(last), s.backward()))
    assert terms["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    assert calls[-1] is True and not any(calls[:-1])  # one backward per chunk, the last one flagged
    _close(_grads(enc), ref_g)


def test_cached_step_replays_dropout(tiny):
    """With dropout on, GradCache re-encodes under the same RNG state: the gradient equals the plain step's."""
    batch = global_batch(1, b=4, g=3)
    grads = []
    for cached in (False, True):
        enc = tiny()
        enc.backbone.config.attention_dropout = 0.3
        for m in enc.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.3
        enc.train()
        torch.manual_seed(123)
        if cached:
            step = CachedStep(enc, chunk_tokens=16)
            step.forward(batch, 1, LossConfig())
            step.backward(lambda s, last: s.backward())
        else:
            compute(enc, batch, 1, LossConfig(), chunk_tokens=16)["loss"].backward()
        grads.append(_grads(enc))
    _close(grads[1], grads[0])


def test_encode_chunked_keeps_batch_order(tiny):
    enc = tiny().eval()
    batch = global_batch(1, b=4, g=3)
    ids, mask = batch["doc_input_ids"], batch["doc_attention_mask"]
    with torch.no_grad():
        whole = enc(ids, mask)
        parts = encode_chunked(enc, ids, mask, budget=16)
    assert torch.allclose(whole, parts, atol=1e-6)


def test_assign_chunks_balances_by_cost_and_covers_every_chunk_once():
    from modeling.chunking import assign_chunks

    costs = [100, 80, 60, 40, 30, 20, 10, 10, 5]
    shares = assign_chunks(costs, 2)
    assert sorted(j for s in shares for j in s) == list(range(len(costs)))
    loads = [sum(costs[j] for j in s) for s in shares]
    # LPT: within a small chunk
    assert abs(loads[0] - loads[1]) <= max(costs[j] for j in range(len(costs)) if costs[j] <= 10)
    assert shares == assign_chunks(costs, 2)  # deterministic: every rank computes the same split alone
    assert assign_chunks(costs, 1) == [sorted(range(len(costs)), key=lambda j: -costs[j])]
    assert assign_chunks([7], 3) == [[0], [], []]  # fewer chunks than ranks: the others run fillers
