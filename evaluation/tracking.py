"""Evaluation results where the model's history is: an `evaluation` run nested under the export's training run in
MLflow (metrics per set and mode, the run files and paired tests as artifacts), and the model card's table.

The export's e2rank.json names its run and store (`mlflow_run_id`, `tracking_uri`); the client is built for that
store explicitly, so nothing here changes the process's global MLflow state. Never fatal: a store that cannot be
reached costs a warning, since the results are already on disk.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
METRICS = {"NDCG@10": "ndcg_at_10", "MRR@10": "mrr_at_10", "Recall@100": "recall_at_100"}
MODES = ("first_stage", "retrieval", "listwise")


def metric_dict(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{set: evaluate() result} -> {"<set>.<mode>.<metric>": value}, MLflow-safe names."""
    out = {}
    for name, res in results.items():
        for mode in MODES:
            for k, v in (res.get(mode) or {}).items():
                if k in METRICS:
                    out[f"{re.sub(r'[^0-9A-Za-z_.-]', '_', name)}.{mode}.{METRICS[k]}"] = float(v)
    return out


def card_section(results: dict[str, dict[str, Any]], paired: dict[str, dict[str, float]] | None = None) -> str:
    lines = [
        "## Evaluation",
        "",
        "| set | queries | mode | NDCG@10 | MRR@10 | Recall@100 |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for mode in MODES:
            m = res.get(mode)
            if m:
                label = "first stage (input order)" if mode == "first_stage" else mode
                lines.append(
                    f"| {name} | {res.get('queries')} | {label} | "
                    + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in METRICS)
                    + " |"
                )
    if paired:
        lines += [
            "",
            "Paired over queries (b vs a: NDCG@10 a -> b, b - a [95% bootstrap CI], t-test p):",
            "",
            "| comparison | a -> b | b - a [95% CI] | p |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c} | {t['mean_a']:.4f} -> {t['mean_b']:.4f} | {t['diff']:+.4f} "
            f"[{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}] | {t['p_ttest']:.2g} |"
            for c, t in paired.items()
        ]
    return "\n".join(lines)


def record(
    export: Path,
    results: dict[str, dict[str, Any]],
    artifacts: list[Path] = (),
    paired: dict[str, dict[str, float]] | None = None,
    tracking_uri: str | None = None,
    card: bool = True,
    mlflow: bool = True,
) -> str | None:
    """Log `results` ({set: evaluate() result}) as a run nested under the export's training run, and put the table in
    the export's model card. Returns the evaluation run's id (None when MLflow could not take it)."""
    export = Path(export)
    info_path = export / "e2rank.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if card and (export / "README.md").is_file():
        from modeling.model_card import set_evaluation

        try:
            set_evaluation(export, card_section(results, paired))
        except (OSError, ValueError) as e:
            log.warning("model card of %s not updated: %s", export, e)
    parent, uri = info.get("mlflow_run_id"), tracking_uri or info.get("tracking_uri")
    if not mlflow:
        return None
    if not uri:
        log.warning("%s names no MLflow store: evaluation metrics stay in the output folder", export)
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if parent:
            exp_id = client.get_run(parent).info.experiment_id
        else:
            exp = client.get_experiment_by_name("e2rank-evaluation")
            exp_id = exp.experiment_id if exp else client.create_experiment("e2rank-evaluation")
        tags = {"e2rank.export": str(export.resolve()), "e2rank.sets": ",".join(results)}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp_id, run_name="evaluation", tags=tags)
        rid = run.info.run_id
        for k, v in metric_dict(results).items():
            client.log_metric(rid, k, v)
        for name, res in results.items():
            client.log_dict(rid, res, f"results/{name}.json")
        if paired:
            client.log_dict(rid, paired, "paired_tests.json")
        for a in artifacts:
            if Path(a).is_file():
                client.log_artifact(rid, str(a), "runs")
        client.set_terminated(rid)
    except Exception as e:  # the numbers are on disk already; an unreachable store costs a warning
        if re.search(r"\b(401|403)\b|UNAUTHENTICATED|PERMISSION_DENIED", str(e)):
            from common.mlflow_access import TrackingAccessError

            raise TrackingAccessError(
                f"MLflow at {uri} refused the evaluation run ({str(e)[:200]}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the results are in "
                "the output folder)"
            ) from None
        log.warning("evaluation of %s not logged to MLflow at %s: %s", export, uri, e)
        return None
    log.info("evaluation logged to MLflow run %s (parent %s)", rid, parent)
    return rid
