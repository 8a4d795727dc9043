"""Shared fixtures: real tokenizers, a real local Ray, a real Ray head on 127.0.0.1, real data when present.

Everything here that listens runs inside the loopback-only namespace that scripts/test enters, binds 127.0.0.1,
runs in its own process group and is killed by group id in a finally block.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups_of_tree(pid: int) -> set[int]:
    """Process groups of pid and all its descendants: torchrun starts each worker in a session of its own, so
    killing the launcher's group alone would orphan the ranks."""
    import psutil

    groups = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return groups
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    return groups


def kill_group(proc: subprocess.Popen, grace: float = 5.0, term: bool = True) -> None:
    """Stop what we started, by process group id: the launcher's group and those of its descendants.
    SIGTERM, a grace period, then SIGKILL (never pkill / ray stop); term=False: SIGKILL at once, as a crash would."""
    groups = _groups_of_tree(proc.pid) | {proc.pid}
    for sig in (signal.SIGTERM, signal.SIGKILL) if term else (signal.SIGKILL,):
        if sig == signal.SIGKILL:
            groups |= _groups_of_tree(proc.pid)
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGTERM and grace:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    proc.wait(timeout=30)


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

    ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=tempfile.mkdtemp(prefix="e2r-", dir="/tmp"),
             num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _wait_for_job_agent(url: str, deadline: float) -> None:
    """The dashboard answers before the head's job agent does ("No available agent to submit job"): submit a
    no-op job until one is accepted and finishes."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            raise RuntimeError("the Ray head's job agent did not run a no-op job in time")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) on 127.0.0.1, in its own process group."""
    require_netns()
    from data_pipeline.job import ray_temp_dir

    port, dash = free_port(), free_port()
    log = tmp_path_factory.mktemp("rayhead") / "head.log"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--node-ip-address", "127.0.0.1",
        "--num-cpus", "2", "--object-store-memory", "300000000", "--disable-usage-stats",
        # own agent/client ports: the session's embedded Ray (ray_local) already holds the default 52365
        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--temp-dir", ray_temp_dir(),
    ]
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 240  # generous: a loaded 2-core box starts the job agent slowly
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Ray head did not come up: {log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        _wait_for_job_agent(url, deadline)
        yield url
    finally:
        kill_group(proc)
