"""modeling/cpu_attention.py: a bf16 decoder training on the CPU attends in fp32 over short sequences, and only
there (evaluation, long sequences and fp32 models are sdpa unchanged); masks are built as for sdpa; the trainer's
loader picks it and says so."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from modeling import cpu_attention
from modeling.embedding import embed
from modeling.packing import register as register_packed
from tests.trainer_fixtures import make_tiny_model
from trainer.config import ModelConfig
from trainer.model import load_backbone


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cpu_attn") / "m")


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The dtypes F.scaled_dot_product_attention is called with (the real function still runs)."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append(q.dtype)
        return real(q, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def batch(n: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40000, (n, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : width // 2] = 0  # one left-padded row
    return ids, mask


def models(model_dir, max_len: int = cpu_attention.MAX_LEN):
    a = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16)
    b = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16)
    b.set_attn_implementation(cpu_attention.register())
    assert cpu_attention.set_max_len(b, max_len) == a.config.num_hidden_layers
    return a, b


@pytest.mark.parametrize("width,training,expect", [(16, True, torch.float32), (16, False, torch.bfloat16),
                                                    (40, True, torch.bfloat16)])
def test_fp32_only_when_training_short_sequences(model_dir, sdpa_dtypes, width, training, expect):
    _, b = models(model_dir, max_len=32)
    b.train(training)
    embed(b, *batch(3, width), "last")
    assert sdpa_dtypes and set(sdpa_dtypes) == {expect}


def test_evaluation_is_bitwise_sdpa(model_dir):
    a, b = models(model_dir)
    a.eval(), b.eval()
    ids, mask = batch(4, 24)
    with torch.no_grad():
        assert torch.equal(embed(a, ids, mask, "last"), embed(b, ids, mask, "last"))


def grads_of(model, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    e = embed(model, ids, mask, "last")
    w = torch.randn(e.shape, generator=torch.Generator().manual_seed(1))
    (e * w).sum().backward()
    return e.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


def rel_err(g: dict, ref: dict) -> float:
    return max(((g[n] - ref[n]).abs().max() / (ref[n].abs().max() + 1e-12)).item() for n in ref)


def test_training_stays_within_bf16_round_off_and_masks_are_built(model_dir):
    """Against the fp32 model, the bf16 model's embeddings and gradients are as close with fp32 attention as with
    bf16 sdpa (both ~1e-2 of the largest gradient entry: bf16 weights and activations); and a padding mask passed
    straight to the backbone is honoured (no mask built would attend to padding: far off)."""
    a, b = models(model_dir)
    ref = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    ids, mask = batch(4, 24)
    e32, g32 = grads_of(ref, ids, mask)
    ea, ga = grads_of(a, ids, mask)
    eb, gb = grads_of(b, ids, mask)
    assert (eb - e32).abs().max() < 5e-3 and (ea - e32).abs().max() < 5e-3
    assert rel_err(gb, g32) < 3e-2 and rel_err(ga, g32) < 3e-2, (rel_err(gb, g32), rel_err(ga, g32))
    ha = a(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    hb = b(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    assert ((ha.float() - hb.float()).abs().max() / ha.float().abs().max()).item() < 3e-2


def test_packed_rows_use_their_longest_sequence(model_dir, sdpa_dtypes):
    m = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16)
    m.set_attn_implementation(register_packed())
    cpu_attention.set_max_len(m, 20)
    m.train()
    embed(m, *batch(3, 16), "last")  # a packed row of ~40 tokens, sequences of <= 16
    assert set(sdpa_dtypes) == {torch.float32}
    sdpa_dtypes.clear()
    embed(m, *batch(3, 24), "last")
    assert set(sdpa_dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("dtype,max_len,expect", [("bf16", 192, cpu_attention.NAME), ("bf16", 0, "sdpa"),
                                                  ("fp32", 192, "sdpa")])
def test_the_trainer_picks_it_for_bf16_on_cpu(model_dir, dtype, max_len, expect, tmp_path):
    cfg = ModelConfig(path=str(model_dir), fp32_attention_max_len=max_len)
    model, impl = load_backbone(str(model_dir), cfg, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], False)
    assert model.config._attn_implementation == expect
    assert ("fp32 attention up to 192 tokens" in impl) == (expect == cpu_attention.NAME), impl
    model.save_pretrained(tmp_path / "out")  # an export loads anywhere: the custom name is not saved
    assert cpu_attention.NAME not in json.dumps(json.loads((tmp_path / "out" / "config.json").read_text()))
