"""Shared fixtures: real tokenizers, a real local Ray, a real Ray head on 127.0.0.1, real data when present.

Everything here that listens runs inside the loopback-only namespace that scripts/test enters, binds 127.0.0.1,
runs in its own process group and is killed by group id in a finally block.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from common.net import free_port  # noqa: F401  (tests import it from here)
from common.procs import kill_tree

pytest_plugins = ["tests.trainer_fixtures"]  # setup, full_run: one of each per session

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("E2RANK_SHARED_DATA", ROOT.parent / "shared" / "data"))


def write_jsonl(path: Path, rows: list) -> Path:
    """rows: dicts (dumped), str (written raw), or bytes (written raw)."""
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, bytes):
                f.write(r + b"\n")
            elif isinstance(r, str):
                f.write(r.encode() + b"\n")
            else:
                f.write(json.dumps(r).encode() + b"\n")
    return path


def kill_group(proc: subprocess.Popen, grace: float = 5.0, term: bool = True) -> None:
    """Stop what we started, by process group id: the launcher's group and those of its descendants.
    SIGTERM, a grace period, then SIGKILL (never pkill / ray stop); term=False: SIGKILL at once, as a crash would."""
    kill_tree(proc, grace, term)


def require_netns() -> None:
    if os.environ.get("E2RANK_IN_NETNS") != "1":
        pytest.skip("listens on sockets: run through scripts/test (loopback-only network namespace)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data not found at {SHARED} (set E2RANK_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def qwen3_tokenizer_path(shared_data) -> str:
    p = shared_data / "tokenizers" / "qwen3"
    if not (p / "tokenizer.json").is_file():
        pytest.skip(f"Qwen3 tokenizer not found at {p}")
    return str(p)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the session's in-process pipeline runs (job.run reuses an initialised Ray)."""
    require_netns()
    import tempfile

    import ray

    from common.ray_auth import ensure_local_token

    temp = tempfile.mkdtemp(prefix="e2r-", dir="/tmp")
    ensure_local_token()  # token auth on (scripts/env.sh), a token of this session's own
    ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=temp,
             num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) on 127.0.0.1, in its own process group."""
    require_netns()
    from common.ray_head import RayHead

    head = RayHead(tmp_path_factory.mktemp("rayhead") / "head.log")
    try:
        head.wait(240)  # generous: a loaded 2-core box starts the job agent slowly
        yield head  # .url, and .env (its token file's path) for whatever submits to it
    finally:
        head.stop()


def mlflow_training_run(folder: Path):
    """A sqlite MLflow store in `folder` with one `stage2` run, as a training run leaves it: (client, experiment id,
    run id, tracking URI)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e2rank", artifact_location=(folder / "art").as_uri())
    return client, exp, client.create_run(exp, run_name="stage2").info.run_id, uri
