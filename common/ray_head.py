"""A real Ray head on 127.0.0.1 (`ray start --head --block`) in its own process group, for the main job and the
tests: token authentication on with a token of its own (common/ray_auth.py), started, waited for until its job
agent runs a job, and stopped by process group. Talk to it with `env` (subprocesses: `ray job submit`) or
`headers` (the job submission SDK)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .cpu_allocator import WORKER_ENV
from .net import free_port
from .procs import kill_tree
from .ray_auth import bearer, child_env, token_dir, write_token


def ray_temp_dir() -> str:
    """A session folder of our own for each Ray instance we start: Ray's shared /tmp/ray/ray_current_cluster would
    otherwise hand jobs the address of whichever instance on the machine wrote it last. Short, because Ray's unix
    socket paths under it must stay below 108 bytes."""
    return tempfile.mkdtemp(prefix="e2r-", dir="/tmp")


class RayHead:
    def __init__(self, log: Path, num_cpus: int = 2, object_store_bytes: int = 300_000_000):
        self.temp = ray_temp_dir()  # (seen without it: a job handed a dead head's address, hung)
        self.dash = free_port()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(free_port()),
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash),
               "--num-cpus", str(num_cpus), "--object-store-memory", str(object_store_bytes), "--disable-usage-stats",
               # own agent / client ports: another Ray on the machine (an embedded one) may hold the defaults
               "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
               "--temp-dir", self.temp]
        self.token_path = write_token(token_dir())  # a 0700 folder of its own, the file 0600
        # for processes that submit to it, and the head itself (whose workers inherit WORKER_ENV)
        self.env = child_env(self.token_path, {**WORKER_ENV, **os.environ})
        self.headers = bearer(self.token_path)
        self.log_path = Path(log)
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        self.url = f"http://127.0.0.1:{self.dash}"

    def wait(self, timeout: float = 240) -> None:
        """Until the dashboard answers and the job agent has run a no-op job (the dashboard answers first, and a
        job submitted before the agent is up fails with "No available agent to submit job")."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        deadline = time.time() + timeout
        job = None
        while job is None:
            try:
                urllib.request.urlopen(self.url + "/api/gcs_healthz", timeout=2).read()  # public: no token needed
                job = JobSubmissionClient(self.url, headers=self.headers).submit_job(entrypoint="true")
            except (OSError, RuntimeError, ConnectionError):
                if self.proc.poll() is not None or time.time() > deadline:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the Ray head did not start; see {self.log_path}:\n{tail}") from None
                time.sleep(1)
        client = JobSubmissionClient(self.url, headers=self.headers)
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.time() > deadline:
                raise RuntimeError("the Ray head's job agent did not run a no-op job in time")
            time.sleep(0.5)

    def stop(self) -> None:
        kill_tree(self.proc)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
        shutil.rmtree(self.token_path.parent, ignore_errors=True)
