"""Before anything trains or is evaluated: the MLflow tracking server accepts our credentials, and no credentials
sit in the tracking URI (it is saved in config.yaml and logged as a param)."""

from __future__ import annotations

import os
import re


class TrackingAccessError(RuntimeError):
    """The tracking server refused us (bad or missing credentials), or credentials were put where they would leak."""


CREDENTIALS_IN_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", re.I)


def check_access(uri: str, timeout: float = 10.0) -> None:
    """Before anything trains: an HTTP(S) tracking server that refuses our credentials (or their absence) is an
    error naming what to set, never a silent fallback to local files. An unreachable server is not an error here
    (the Tracker warns and training goes on with metrics.jsonl). Credentials come from the standard
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) environment, never from the URI:
    the URI is saved in config.yaml and logged as a param."""
    import base64
    import urllib.error
    import urllib.request

    if CREDENTIALS_IN_URI.match(uri or ""):
        raise TrackingAccessError("the tracking URI holds credentials (user:password@host), which would be saved in "
                                  "config.yaml and the run's params: use MLFLOW_TRACKING_USERNAME and "
                                  "MLFLOW_TRACKING_PASSWORD instead")
    if not (uri or "").startswith(("http://", "https://")):
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {}
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
    req = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers=headers)
    try:
        urllib.request.urlopen(req, timeout=timeout).read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            who = f"user {user!r}" if user else "a request without credentials"
            raise TrackingAccessError(
                f"MLflow at {uri} refused {who} (HTTP {e.code}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to an account of that server (or MLFLOW_TRACKING_TOKEN); nothing was "
                "trained or logged") from None
    except OSError:
        pass  # unreachable: the Tracker says so and training goes on
