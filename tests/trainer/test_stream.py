"""Streaming shards with webdataset (trainer/stream.py) from a real HTTP server on 127.0.0.1 and through `pipe:`:
equal batch counts per rank, disjoint and complete up to the counted drop, exact resume, damaged streams named,
and the trainer on streamed shards under torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from data_pipeline.config import PipelineConfig
from data_pipeline.job import run
from tests.conftest import free_port, kill_group, require_netns, write_jsonl
from tests.data_pipeline.test_pipeline_job import contrastive_rows
from tests.trainer_fixtures import TOK, torchrun, train_cmd
from trainer.loader import LoaderConfig, LoaderError
from trainer.stream import StreamingShardLoader, make_loader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """90 samples in 7 shards, served by `python -m http.server` on 127.0.0.1 (its own process group); a second
    folder beside it holds only the manifest, as a node without the shards would."""
    require_netns()
    d = tmp_path_factory.mktemp("stream")
    src = write_jsonl(d / "c.jsonl", contrastive_rows(90))
    run(PipelineConfig(kind="contrastive", inputs=[str(src)], output=str(d / "shards"), samples_per_shard=13,
                       tokenization=TOK, progress=False))
    (d / "manifest_only").mkdir()
    shutil.copy(d / "shards" / "manifest.json", d / "manifest_only" / "manifest.json")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(d / "shards")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/manifest.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield {"dir": d, "url": url + "/{name}", "manifest": d / "manifest_only"}
    finally:
        kill_group(proc)


def _cfg(url, **kw):
    return LoaderConfig(batch_size=4, negatives_per_query=1, seed=5, stream_url=url, shuffle_buffer=16, **kw)


def _epoch(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_ranks_get_equal_counts_disjoint_samples_and_the_drop_is_counted(served):
    cfg = _cfg(served["url"])
    ranks = [make_loader(served["manifest"], cfg, rank=r, world_size=2) for r in range(2)]
    assert all(isinstance(x, StreamingShardLoader) for x in ranks)
    batches = [_epoch(x) for x in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) > 0
    keys = [k for bs in batches for b in bs for k in b["keys"]]
    assert len(keys) == len(set(keys))  # no sample twice in an epoch
    assert len(keys) + ranks[0].dropped_per_epoch == 90
    again = [k for b in _epoch(make_loader(served["manifest"], cfg, rank=0, world_size=2)) for k in b["keys"]]
    assert again == [k for b in batches[0] for k in b["keys"]]  # seeded: the same order every time
    assert ranks[0].epoch == 1 and [k for b in _epoch(ranks[0]) for k in b["keys"]] != again  # a new epoch reshuffles


def test_resume_mid_epoch_is_exact_and_pipe_gives_the_same_stream(served):
    cfg = _cfg(served["url"])
    full = _epoch(make_loader(served["manifest"], cfg, rank=1, world_size=2))
    first = make_loader(served["manifest"], cfg, rank=1, world_size=2)
    head = _epoch(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    second = make_loader(served["manifest"], cfg, rank=1, world_size=2)
    second.load_state_dict(state)
    tail = _epoch(second)
    assert [b["keys"] for b in head + tail] == [b["keys"] for b in full]
    assert all(torch.equal(a["doc_input_ids"], b["doc_input_ids"]) for a, b in zip(head + tail, full))
    piped = _cfg(f"pipe:cat {served['dir'] / 'shards'}/{{name}}")
    assert [b["keys"] for b in _epoch(make_loader(served["manifest"], piped, rank=1, world_size=2))] == \
        [b["keys"] for b in full]
    with pytest.raises(LoaderError, match="cannot resume a streamed epoch on another world size"):
        make_loader(served["manifest"], _cfg(served["url"]), rank=0, world_size=1).load_state_dict(state)


def test_a_cut_stream_names_the_shard(served, tmp_path):
    shutil.copytree(served["dir"] / "shards", tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    victim = tmp_path / "s" / m["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    loader = make_loader(served["manifest"], _cfg(f"pipe:cat {tmp_path / 's'}/{{name}}"), rank=0, world_size=1)
    with pytest.raises(Exception, match=m["shards"][0]["name"]):
        _epoch(loader)


def test_training_on_streamed_shards(served, tmp_path):
    """2 ranks, ZeRO-3, the shards only over HTTP: training runs, and a stop + resume logs the same losses."""
    from tests.trainer_fixtures import losses, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    args = ("loader.negatives_per_query=1", f"loader.stream_url={served['url']}", "loader.shuffle_buffer=16",
            "run.max_steps=4", "run.save_every=2", "run.export=false")
    full = torchrun(train_cmd(served["manifest"], model, tmp_path / "full", *args))
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-3000:]
    assert "[train] step 4/4" in full.stdout
    part = torchrun(train_cmd(served["manifest"], model, tmp_path / "part", *args, "run.stop_after_steps=2"))
    assert part.returncode == 0, part.stderr[-3000:]
    rest = torchrun(train_cmd(served["manifest"], model, tmp_path / "part", *args))
    assert rest.returncode == 0 and "resumed_from=step00000002" in rest.stdout, rest.stderr[-3000:]
    want, got = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert all(got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-6) for s in range(1, 5))
    assert not list((served["manifest"]).glob("*.tar"))  # the node never had the shards
