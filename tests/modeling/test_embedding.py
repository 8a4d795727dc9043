"""Pooling and embedding (trainer/model.py): the one owner of how hidden states become an embedding."""

import pytest
import torch

from modeling.embedding import embed, pool


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
    """Golden test (as sentence-transformers checks its pooling): the same text embeds the same with left padding,
    right padding or none."""
    from transformers import AutoModel, BertConfig, LlamaConfig

    torch.manual_seed(0)
    if arch == "llama":
        cfg, pooling = (
            LlamaConfig(
                vocab_size=100,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
            ),
            "last",
        )
    else:
        cfg, pooling = (
            BertConfig(
                vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            ),
            "mean",
        )
    m = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = embed(m, ids, torch.ones_like(ids), pooling)
    left = embed(m, torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]]), pooling)
    right = embed(m, torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]), pooling)
    assert torch.allclose(alone, left, atol=1e-5) and torch.allclose(alone, right, atol=1e-5)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1))
