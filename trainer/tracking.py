"""MLflow from rank 0, never fatal: every metric also goes to metrics.jsonl in the run folder, so an unreachable
tracking server costs a warning, not the run or its numbers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class Tracker:
    def __init__(self, output_dir: Path, uri: str, experiment: str, run_name: str, run_id: str | None, enabled: bool):
        self.enabled = enabled
        self.local = output_dir / "metrics.jsonl"
        self.run_id = run_id
        self.ok = False
        if not enabled:
            return
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
        self.uri = uri
        try:
            import mlflow

            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                # a local store keeps artifacts beside its database, not in ./mlruns of whatever folder the process
                # ran in (a Ray job's working directory is a temporary copy)
                loc = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri() \
                    if uri.startswith("sqlite:///") else None
                try:
                    mlflow.create_experiment(experiment, artifact_location=loc)
                except Exception:  # another process created it meanwhile
                    pass
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name or None)
            self.run_id = run.info.run_id
            self.ok = True
        except Exception as e:  # tracking must never take training down
            log.warning("MLflow at %s unavailable (%s); metrics go to %s only", uri, e, self.local)

    def _call(self, fn: str, *args, **kw) -> None:
        if not self.ok:
            return
        try:
            import mlflow

            getattr(mlflow, fn)(*args, **kw)
        except Exception as e:
            self.ok = False
            log.warning("MLflow call %s failed (%s); metrics continue in %s", fn, e, self.local)

    def params(self, cfg: dict[str, Any], extra: dict[str, Any]) -> None:
        if self.enabled:
            self._call("log_params", {**_flatten(cfg), **_flatten(extra)})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self._call("log_metrics", values, step=step)

    def artifact(self, path: Path) -> None:
        if self.enabled and path.exists():
            self._call("log_artifact", str(path))

    def artifact_dir(self, path: Path, name: str) -> None:
        if self.enabled and path.is_dir():
            self._call("log_artifacts", str(path), artifact_path=name)

    def model(self, export: Path, register_as: str = "") -> str | None:
        """The export as this run's MLflow model `model` (registered when `register_as`); its URI, or None."""
        if not (self.enabled and self.ok):
            return None
        try:
            from .mlflow_model import log as log_model

            info = log_model(export, register_as)
        except Exception as e:
            log.warning("logging %s as an MLflow model failed (%s); the folder is still there", export, e)
            return None
        where = f"runs:/{self.run_id}/model" + (f", models:/{register_as}/{info.registered_model_version}"
                                                 if register_as else "")
        log.info("MLflow model: %s (mlflow.pyfunc.load_model)", where)
        return f"runs:/{self.run_id}/model"

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._call("set_tag", key, value)

    def close(self) -> None:
        if self.enabled and self.ok:
            self._call("end_run")
