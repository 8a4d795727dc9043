"""Ray token authentication for every Ray we start (Ray >= 2.52, `RAY_AUTH_MODE=token`).

A Ray head runs any job submitted to its dashboard port as its own user (Ray's security page; the ShadowRay attacks),
so each head we start gets its own random token in a file only its owner can read, and the processes that talk to
it get the file's path (`RAY_AUTH_TOKEN_PATH`), never the token itself: printed commands, logs, configs and MLflow
params cannot show what they never hold. Ray reads the token from `RAY_AUTH_TOKEN`, then `RAY_AUTH_TOKEN_PATH`,
then `~/.ray/auth_token`; we use the path and drop an inherited `RAY_AUTH_TOKEN` so it cannot shadow it.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

PREFIX = "e2rank-ray-"  # recognisable, so a test can prove no log or param ever holds one
PATTERN = re.compile(re.escape(PREFIX) + r"[0-9a-f]{64}")


def write_token(folder: Path) -> Path:
    """A new random token in `folder/ray-auth-token`, created readable and writable by its owner only."""
    path = Path(folder) / "ray-auth-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(PREFIX + secrets.token_hex(32))
    return path


def auth_env(token_path: Path) -> dict[str, str]:
    """What a process needs to run or reach a head with this token (merge into its environment)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def child_env(token_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "RAY_AUTH_TOKEN"}
    return {**env, **auth_env(token_path)}


def bearer(token_path: Path) -> dict[str, str]:
    """The HTTP header for a head's REST API (the job submission SDK's `headers=`)."""
    return {"Authorization": "Bearer " + Path(token_path).read_text().strip()}


def token_dir() -> Path:
    """A folder only its owner can enter (Ray makes its own temp folder world-writable: the token cannot go there)."""
    return Path(tempfile.mkdtemp(prefix="e2r-auth-", dir="/tmp"))  # mkdtemp: mode 0700


def ensure_local_token() -> None:
    """Before an embedded `ray.init()` in this process: with token auth on (our default, and Ray's for local
    clusters since 2.59) and no token configured, a token of its own, instead of Ray writing one to
    ~/.ray/auth_token that every later cluster of this user would share."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = write_token(token_dir())
    os.environ.update(auth_env(path))
    # the embedded Ray this token is for ends with this process: so does the token (no stale secrets in /tmp)
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)
    if "ray._raylet" in sys.modules:  # Ray read RAY_AUTH_MODE when imported: have it read the settings again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def redact(text: str) -> str:
    return PATTERN.sub(PREFIX + "<redacted>", text)
