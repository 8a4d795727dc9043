"""Losses and pooling against hand-computed values."""

import math

import pytest
import torch

from trainer.losses import info_nce, ranknet
from trainer.model import embed, pool


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


def test_pool_last_left_and_right_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert pool(h, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(h, right, "last").flatten().tolist() == [2.0, 5.0]
    assert pool(h, left, "mean").flatten().tolist() == [2.0, 6.5]
    assert pool(h, left, "cls").flatten().tolist() == [1.0, 6.0]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_embeddings_do_not_depend_on_padding(arch):
    """Golden test (peers.md P11): the same text embeds the same with left padding, right padding or none."""
    from transformers import AutoModel, BertConfig, LlamaConfig

    torch.manual_seed(0)
    if arch == "llama":
        cfg, pooling = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8), "last"
    else:
        cfg, pooling = BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4), "mean"
    m = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = embed(m, ids, torch.ones_like(ids), pooling)
    left = embed(m, torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]]), pooling)
    right = embed(m, torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]), pooling)
    assert torch.allclose(alone, left, atol=1e-5) and torch.allclose(alone, right, atol=1e-5)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1))
