"""A team MLflow server with authentication (`mlflow server --app-name basic-auth` on 127.0.0.1): the trainer logs
with the standard MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, is refused with a clear error without them
(nothing trains, no silent fallback to local files), and the password reaches no log, config or param."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import free_port, kill_group, require_netns
from tests.trainer_fixtures import torchrun, train_cmd, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    require_netns()
    d = tmp_path_factory.mktemp("mlflow_auth")
    password = "pw-" + secrets.token_hex(16)
    ini = d / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{d / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                            "--port", str(port), "--backend-store-uri", f"sqlite:///{d / 'srv.db'}",
                            "--artifacts-destination", str(d / "art"), "--workers", "1"], cwd=d,
                           stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                                "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)})
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(url + "/health", timeout=1).read() == b"OK"
        except OSError:
            return False

    try:
        wait_for(up, 120, "the basic-auth mlflow server did not come up")
        yield url, password, d
    finally:
        kill_group(srv)


def _train(setup, out, url, **creds):
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": "",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", **creds}
    return torchrun(train_cmd(setup["c"], setup["model"], out, "run.max_steps=2", "run.export=false"), env=env)


def test_without_or_with_wrong_credentials_nothing_trains(setup, auth_server, tmp_path):
    url, password, _ = auth_server
    for creds, who in (({}, "without credentials"), ({"MLFLOW_TRACKING_USERNAME": "admin",
                                                       "MLFLOW_TRACKING_PASSWORD": "wrong"}, "user 'admin'")):
        out = tmp_path / f"run-{len(creds)}"
        r = _train(setup, out, url, **creds)
        assert r.returncode != 0, r.stderr[-3000:]  # the ranks exit 2, torchrun 1
        assert f"MLflow at {url} refused" in r.stderr and "MLFLOW_TRACKING_USERNAME" in r.stderr
        assert (who if creds else "a request without credentials") in r.stderr
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_with_credentials_it_logs_and_the_password_is_nowhere(setup, auth_server, tmp_path, monkeypatch):
    url, password, _ = auth_server
    out = tmp_path / "run"
    r = _train(setup, out, url, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run = client.search_runs([client.get_experiment_by_name("e2rank").experiment_id])[0]
    assert len(client.get_metric_history(run.info.run_id, "infonce")) == 2
    for text in (r.stdout, r.stderr, (out / "config.yaml").read_text(), json.dumps(run.data.params),
                 json.dumps(run.data.tags)):
        assert password not in text


def test_credentials_in_the_uri_are_refused_before_they_are_saved(setup, auth_server, tmp_path):
    url, password, _ = auth_server
    out = tmp_path / "run"
    r = torchrun(train_cmd(setup["c"], setup["model"], out, "run.max_steps=2", "run.export=false",
                           f"tracking.tracking_uri={url.replace('//', f'//admin:{password}@')}"))
    assert r.returncode != 0 and "holds credentials" in r.stderr
    assert not (out / "config.yaml").exists() or password not in (out / "config.yaml").read_text()


def test_an_evaluation_record_is_refused_without_credentials(auth_server, tmp_path, monkeypatch):
    from common.mlflow_access import TrackingAccessError
    from evaluation.tracking import record

    url, _, _ = auth_server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "e2rank.json").write_text(json.dumps({"tracking_uri": url}))
    with pytest.raises(TrackingAccessError, match="refused the evaluation run"):
        record(tmp_path, {"s": {"retrieval": {"NDCG@10": 0.5}}})
