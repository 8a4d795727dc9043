"""Damaged shards: the loader and `python -m data_pipeline verify` name the shard and what differs from the manifest;
a pipeline re-run rebuilds exactly the damaged shards, byte-identical to the originals."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest

from data_pipeline.config import PipelineConfig
from data_pipeline.job import run
from data_pipeline.shards import ShardFormatError, ShardReader, read_manifest
from tests.conftest import ROOT, write_jsonl
from tests.data_pipeline.test_pipeline_job import TOK, contrastive_rows, shard_hashes
from trainer.loader import LoaderConfig, ShardLoader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    src = write_jsonl(d / "c.jsonl", contrastive_rows(30))
    c = PipelineConfig(kind="contrastive", inputs=[str(src)], output=str(d / "good"), samples_per_shard=10,
                       tokenization=TOK, progress=False)
    run(c)
    return d, c


def damaged_copy(built, tmp_path, how: str):
    d, c = built
    out = tmp_path / "shards"
    shutil.copytree(d / "good", out)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":  # one byte inside a token array's payload: the tar still parses
        r = ShardReader(shard, "contrastive")
        off, size = r.index[r.keys[0]]["doc_ids.npy"]
        r.close()
        data[off + size - 1] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    return out


def _iterate(out, **kw):
    for _ in ShardLoader(out, LoaderConfig(batch_size=2, **kw), rank=0, world_size=1):
        pass


@pytest.mark.parametrize("how, error", [("truncate", r"shard-000001.tar: size \d+ bytes, the manifest says \d+"),
                                        ("missing", r"shard-000001.tar: missing"),
                                        ("flip", r"shard-000001.tar: sha256 .* the manifest says")])
def test_loader_names_the_damaged_shard(built, tmp_path, how, error):
    out = damaged_copy(built, tmp_path, how)
    with pytest.raises(ShardFormatError, match=error):
        _iterate(out)  # truncation and a missing shard fail at construction; a flipped byte when first opened


def test_flipped_byte_passes_only_with_checksums_off(built, tmp_path):
    out = damaged_copy(built, tmp_path, "flip")
    _iterate(out, verify_checksums=False)  # the user's explicit choice: reads (wrong) tokens without error


def test_unreadable_tar_names_the_file(built, tmp_path):
    out = damaged_copy(built, tmp_path, "truncate")
    with pytest.raises(ShardFormatError, match="shard-000001.tar: not a readable shard"):
        ShardReader(out / "shard-000001.tar", "contrastive")


def test_verify_cli_and_rerun_rebuild_only_the_damaged(built, tmp_path, caplog):
    d, c = built
    out = damaged_copy(built, tmp_path, "flip")
    (out / "shard-000002.tar").write_bytes((out / "shard-000002.tar").read_bytes()[:1000])
    cmd = [sys.executable, "-m", "data_pipeline", "verify", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "shard-000001.tar: sha256" in r.stdout and "shard-000002.tar: size 1000 bytes" in r.stdout
    assert "shard-000000.tar" not in r.stdout and "2 shard(s) to rebuild" in r.stderr
    before = {n: (out / n).stat().st_mtime_ns for n in ("shard-000000.tar",)}
    c2 = PipelineConfig(**{**c.__dict__, "output": str(out)})
    with caplog.at_level(logging.INFO, logger="data_pipeline"):
        run(c2)
    logs = caplog.messages
    assert any("2 damaged shard(s), rebuilding them" in x for x in logs)
    assert any("1 already built, 2 to build" in x for x in logs), logs
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before["shard-000000.tar"]
    assert shard_hashes(out) == shard_hashes(d / "good")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "every shard matches" in r.stdout
    assert read_manifest(out) == read_manifest(d / "good") | {"config": read_manifest(out)["config"]}
