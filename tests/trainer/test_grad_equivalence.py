"""The proof that cross-device negatives are right: 2 gloo ranks under ZeRO-3 give the gradients of one process
on the concatenated batch (stage-1 InfoNCE with hard negatives; the stage-2 InfoNCE + 2 x RankNet total)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from modeling.embedding import Encoder
from tests.conftest import require_netns
from tests.scripts.batch_slice import local_slice
from tests.trainer_fixtures import make_tiny_model, torchrun
from trainer.config import LossConfig
from trainer.objective import compute

pytestmark = pytest.mark.slow


def global_batch(stage: int, b: int = 4, g: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def seqs(n):
        lens = torch.randint(3, 21, (n,), generator=gen)  # 3..20 tokens: chunks of 1 or 2 at 16 tokens a chunk
        w = 20
        ids = torch.zeros(n, w, dtype=torch.long)
        mask = torch.zeros(n, w, dtype=torch.long)
        for i, n_tok in enumerate(lens.tolist()):
            ids[i, w - n_tok:] = torch.randint(10, 49000, (n_tok,), generator=gen)
            mask[i, w - n_tok:] = 1
        return ids, mask

    batch = {"docs_per_query": g}
    batch["query_input_ids"], batch["query_attention_mask"] = seqs(b)
    batch["doc_input_ids"], batch["doc_attention_mask"] = seqs(b * g)
    h = torch.arange(b * g, dtype=torch.long) + 100
    h[(b // 2) * g + 1] = h[0]  # a rank-1 candidate duplicates rank 0's first positive: masked across ranks
    batch["doc_hash"] = h
    if stage == 2:
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = seqs(b)
        batch["ranking"] = torch.stack([torch.randperm(g, generator=gen) for _ in range(b)])
        batch["cand_mask"] = torch.ones(b, g, dtype=torch.bool)
        last = batch["ranking"][b - 1]
        pad = int(last[-1])  # the worst candidate of the last query is padding
        batch["cand_mask"][b - 1, pad] = False
        batch["ranking"][b - 1, -1] = -1
    return batch


@pytest.mark.parametrize("stage, zero, mode", [(1, 3, "padded"), (2, 3, "padded"), (1, 2, "padded"),
                                               (1, 3, "chunked"), (2, 3, "chunked"), (1, 3, "cached"), (2, 3, "cached"),
                                               (1, 3, "packed"), (2, 3, "packed"), (2, 3, "packed-cached"),
                                               (1, 3, "persist"), (1, 3, "local"), (2, 3, "local"),
                                               (2, 3, "local-cached"), (1, 0, "padded"), (2, 0, "cached")])
def test_sharded_gradients_equal_single_process(tmp_path, stage, zero, mode):
    """padded: one forward per field; chunked: length-grouped chunks (chunk counts agreed across ranks);
    cached: GradCache (graph-free embeddings, loss, then chunk-by-chunk re-encoding with cached gradients);
    packed: each chunk one unpadded row with block-diagonal causal attention; persist: ZeRO-3 with every tensor
    whole on every rank (no gathers); local: loss.negatives_cross_device=false, each rank's queries against its own
    candidates only. The reference is always one process on the padded batch (local: the mean of the two halves'
    losses, each half alone)."""
    require_netns()
    model = make_tiny_model(tmp_path / "tiny")
    batch = global_batch(stage)
    torch.save(batch, tmp_path / "batch.pt")
    r = torchrun(["tests/scripts/grad_equiv.py", str(model), str(tmp_path / "batch.pt"), str(stage),
                  str(zero), str(tmp_path / "grads.pt"), mode])
    assert r.returncode == 0, r.stderr[-4000:]
    sharded = torch.load(tmp_path / "grads.pt")

    enc = Encoder(AutoModel.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32), "last")
    if mode.startswith("local"):  # each half scored alone; DeepSpeed averages the ranks' gradients
        loss = sum(compute(enc, half, stage, LossConfig(negatives_cross_device=False))["loss"]
                   for half in (local_slice(batch, 0, 2), local_slice(batch, 1, 2))) / 2
        whole = compute(enc, batch, stage, LossConfig())["loss"].detach()
        assert abs(whole.item() - loss.item()) > 1e-4  # the two settings differ on this batch
    else:
        loss = compute(enc, batch, stage, LossConfig())["loss"]  # one process, the whole batch, no gathering
    loss.backward()
    assert sharded["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in enc.named_parameters():
        ref, got = p.grad, sharded["grads"][name]
        assert got.shape == ref.shape, name
        rel = (got - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)  # fp32 round-off is ~1e-7
        assert rel < 1e-5, f"{name}: max diff {rel:.2e} of the largest gradient"
    assert any(p.grad.abs().max() > 0 for p in enc.parameters())  # the reference has gradients to compare


@pytest.mark.parametrize("stage, zero", [(1, 2), (2, 2), (1, 0), (2, 0)])
def test_bf16_sharded_gradients_track_fp32(tmp_path, stage, zero):
    """model.dtype=bf16 on 2 gloo ranks, under DeepSpeed ZeRO-2 (bf16 forward, backward and gradient reduction; the
    optimizer's fp32 master copy) and ZeRO-0 (MasterAdamW's one flat all-reduce, read from its fp32 masters'
    gradients), points the same way as one fp32 process on the whole batch. A bf16 path that lost or mis-scaled
    gradients (a reduction in the wrong dtype, a missing average over ranks) would fail this."""
    require_netns()
    model = make_tiny_model(tmp_path / "tiny")
    batch = global_batch(stage)
    torch.save(batch, tmp_path / "batch.pt")
    r = torchrun(["tests/scripts/grad_equiv.py", str(model), str(tmp_path / "batch.pt"), str(stage), str(zero),
                  str(tmp_path / "grads.pt"), "chunked", "bf16"])
    assert r.returncode == 0, r.stderr[-4000:]
    sharded = torch.load(tmp_path / "grads.pt")
    enc = Encoder(AutoModel.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32), "last")
    terms = compute(enc, batch, stage, LossConfig())
    terms["loss"].backward()
    assert sharded["loss"].item() == pytest.approx(terms["loss"].item(), rel=2e-2)
    ref = torch.cat([p.grad.double().flatten() for _, p in enc.named_parameters()])
    got = torch.cat([sharded["grads"][n].double().flatten() for n, _ in enc.named_parameters()])
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0).item() > 0.99
    assert got.norm().item() == pytest.approx(ref.norm().item(), rel=0.05)  # same scale: averaged, not summed


@pytest.mark.parametrize("zero", [2, 3])
def test_sharded_dev_encoding_equals_single_process(tmp_path, zero):
    """The trainer's dev evaluation shards its encoding: each of 2 gloo ranks encodes its share of the chunks (13
    texts of uneven length, so one rank runs filler forwards to keep ZeRO-3's collectives in step) and both get every
    embedding back, equal to one process encoding them all."""
    import json

    from common.pretrained import load_tokenizer
    from data_pipeline.text import TextEncoder, TokenizationConfig
    from evaluation.reranker import Reranker

    require_netns()
    model = make_tiny_model(tmp_path / "tiny")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(words[: 1 + (7 * i) % 12] * (1 + i % 3)) for i in range(13)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    r = torchrun(["tests/scripts/sharded_encode.py", str(model), str(tmp_path / "texts.json"), str(zero),
                  str(tmp_path / "emb")])
    assert r.returncode == 0, r.stderr[-4000:]
    got = [torch.load(tmp_path / f"emb.rank{k}") for k in (0, 1)]

    text = TextEncoder(load_tokenizer(str(model)), TokenizationConfig(tokenizer=str(model), doc_max_len=64))
    ref_model = AutoModel.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32)
    ref = Reranker(ref_model, text, "last", batch_size=2, chunk_tokens=48, device="cpu")
    want = torch.from_numpy(ref.embed(texts))
    for g in got:
        assert g["emb"].shape == want.shape
        assert torch.allclose(g["emb"], want, atol=1e-5), (g["emb"] - want).abs().max()
    assert torch.equal(got[0]["emb"], got[1]["emb"])  # both ranks hold the same, complete set
    calls = [g["forward_calls"] for g in got]
    assert sum(calls) == len(texts) and min(calls) > 0, calls  # the work was split, each text encoded once
