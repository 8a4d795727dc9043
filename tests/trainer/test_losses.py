"""Losses (trainer/losses.py) against hand-computed values."""

import math

import pytest
import torch

from trainer.losses import info_nce, ranknet


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_infonce_by_hand():
    out = info_nce(t([[1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0]), temperature=0.5)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-2)))  # logits [2, 0]
    assert out.accuracy.item() == 1.0 and out.masked.item() == 0


def test_infonce_masks_duplicates_of_the_positive():
    docs = t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    plain = info_nce(t([[1.0, 0.0]]), docs, torch.tensor([0]), temperature=0.5)
    assert plain.loss.item() == pytest.approx(math.log(1 + math.exp(-2) + 1))  # the copy counts as a negative
    masked = info_nce(t([[1.0, 0.0]]), docs, torch.tensor([0]), temperature=0.5, doc_hash=torch.tensor([7, 8, 7]))
    assert masked.loss.item() == pytest.approx(math.log(1 + math.exp(-2))) and masked.masked.item() == 1


def test_infonce_valid_and_margin_masks():
    q, docs = t([[1.0, 0.0]]), t([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    out = info_nce(q, docs, torch.tensor([0]), temperature=1.0, valid=torch.tensor([True, True, False]))
    assert out.loss.item() == pytest.approx(-math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(1.0))))
    out = info_nce(q, docs, torch.tensor([0]), temperature=1.0, margin=0.1)  # 1.0 > 0.6 + 0.1: masked
    assert out.loss.item() == pytest.approx(-math.log(math.exp(0.6) / (math.exp(0.6) + 1.0)))
    assert out.masked.item() == 1


def test_ranknet_by_hand():
    p, c = t([[1.0, 0.0]]), t([[[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True]])
    assert ranknet(p, c, torch.tensor([[0, 1]]), mask, scale=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert ranknet(p, c, torch.tensor([[1, 0]]), mask, scale=1.0).item() == pytest.approx(math.log(1 + math.exp(1)))
    assert ranknet(p, c, torch.tensor([[0, 1]]), mask, scale=10.0).item() == pytest.approx(math.log(1 + math.exp(-10)))


def test_ranknet_padding_and_per_query_mean():
    p = t([[1.0, 0.0], [1.0, 0.0]])
    c = t([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]])
    ranking = torch.tensor([[0, 1, -1], [0, 1, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # query 1: one pair (0>1): log(1+e^-1); query 2: pairs (0>1),(0>2),(1>2) with s = [0, 1, 0.6]
    q2 = (math.log(1 + math.exp(1)) + math.log(1 + math.exp(0.6)) + math.log(1 + math.exp(-0.4))) / 3
    got = ranknet(p, c, ranking, mask, scale=1.0).item()
    assert got == pytest.approx((math.log(1 + math.exp(-1)) + q2) / 2)


def test_ranknet_levels_add_no_pair_between_ties():
    p = t([[1.0, 0.0]])
    c = t([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # s = [1, 0, 0.6]
    mask = torch.tensor([[True, True, True]])
    levels = torch.tensor([[0, 1, 1]])  # one relevant, two tied non-relevant: pairs (0>1), (0>2) only
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-0.4))) / 2
    got = ranknet(p, c, torch.tensor([[0, 1, 2]]), mask, scale=1.0, levels=levels).item()
    assert got == pytest.approx(want)
    full = ranknet(p, c, torch.tensor([[0, 1, 2]]), mask, scale=1.0).item()  # the same slate as a full order
    assert full != pytest.approx(want)


def test_ranknet_rank_sum_weighting():
    p, c = t([[1.0, 0.0]]), t([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    s = [1.0, 0.0, 0.6]
    pairs = [(0, 1, 1 / 3), (0, 2, 1 / 4), (1, 2, 1 / 5)]  # ranks 1,2,3 for candidates 0,1,2
    # the official rank_net(weighted=True): BCEWithLogits(weight=w), mean over the pairs (their count, not sum(w))
    want = sum(w * math.log(1 + math.exp(-(s[i] - s[j]))) for i, j, w in pairs) / len(pairs)
    got = ranknet(p, c, torch.tensor([[0, 1, 2]]), torch.tensor([[True] * 3]), scale=1.0, pair_weighting="rank_sum")
    assert got.item() == pytest.approx(want)
    off = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([s[i] - s[j] for i, j, _ in pairs]), torch.ones(3), weight=torch.tensor([w for *_, w in pairs]))
    assert got.item() == pytest.approx(off.item())
