"""trainer/model_card.py and trainer/eval_tracking.py: the export's card, and evaluation results in the card and in
MLflow (a real sqlite store, the evaluation run nested under the training run)."""

import json

import pytest

from evaluation.tracking import card_section, metric_dict, record
from modeling import model_card
from tests.conftest import mlflow_training_run

RES = {"set": "scifact", "queries": 3, "first_stage": {"NDCG@10": 0.5, "MRR@10": 0.4, "Recall@100": 0.9},
       "retrieval": {"NDCG@10": 0.61, "MRR@10": 0.55, "Recall@100": 0.9},
       "listwise": {"NDCG@10": 0.66, "MRR@10": 0.6, "Recall@100": 0.9}}
PAIRED = {"listwise vs retrieval": {"mean_a": 0.61, "mean_b": 0.66, "diff": 0.05, "ci95_low": 0.01, "ci95_high": 0.09,
                                    "p_ttest": 0.012, "queries": 3}}


def _info(**kw):
    return {"stage": 2, "steps": 40, "pooling": "last", "eos_id": 2, "base_model": "pypi:smollm2-135m",
            "text_format": {"doc_max_len": 256, "query_max_len": 64, "prompt_max_len": 2048},
            "data": {"manifest_sha256": "ab" * 32, "samples": 709,
                     "inputs": [{"path": "/x/slates.jsonl", "records": 709, "sha256": "cd" * 32}]},
            "previous_stages": [{"stage": 1, "steps": 20, "data": {"manifest_sha256": "ef" * 32, "samples": 2000,
                                                                   "inputs": []}}],
            "mlflow_run_id": "r123", "tracking_uri": "https://alice:s3cret@mlflow.example.com", **kw}


def test_the_card_has_front_matter_lineage_config_and_no_credentials(tmp_path):
    text = model_card.render(_info(), {"optim": {"lr": 0.0001}})
    assert text.startswith("---\nbase_model: pypi:smollm2-135m\nlibrary_name: sentence-transformers\n")
    assert "| 1 | 20 | 2000 | `efefefefefef` | - |" in text
    assert "| 2 | 40 | 709 | `abababababab` | `slates.jsonl` (709 records, sha256 `cdcdcdcdcdcd`) |" in text
    assert "lr: 0.0001" in text and "s3cret" not in text and "https://***@mlflow.example.com" in text
    assert "Not evaluated yet" in text


def test_evaluation_replaces_its_section_and_refuses_a_card_without_markers(tmp_path):
    model_card.write(tmp_path, _info(), {})
    model_card.set_evaluation(tmp_path, card_section({"scifact": RES}, PAIRED))
    model_card.set_evaluation(tmp_path, card_section({"scifact": RES}, PAIRED))  # twice: replaced, not appended
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "Not evaluated yet" not in text
    assert "| scifact | 3 | listwise | 0.6600 | 0.6000 | 0.9000 |" in text
    assert "| listwise vs retrieval | 0.6100 -> 0.6600 | +0.0500 [+0.0100, +0.0900] | 0.012 |" in text
    (tmp_path / "README.md").write_text("# hand-written\n")
    with pytest.raises(ValueError, match="no evaluation markers"):
        model_card.set_evaluation(tmp_path, "x")


def test_metric_names_are_mlflow_safe():
    assert metric_dict({"demo (eval)": RES})["demo__eval_.listwise.ndcg_at_10"] == 0.66
    assert len(metric_dict({"s": RES})) == 9


def test_record_nests_an_evaluation_run_under_the_training_run(tmp_path, monkeypatch):
    client, exp, parent, uri = mlflow_training_run(tmp_path)
    export = tmp_path / "export"
    export.mkdir()
    (export / "e2rank.json").write_text(json.dumps(_info(mlflow_run_id=parent, tracking_uri=uri)))
    model_card.write(export, json.loads((export / "e2rank.json").read_text()), {})
    (tmp_path / "scifact.model.listwise.trec").write_text("q1 Q0 d1 1 0.5 model\n")
    rid = record(export, {"scifact": RES}, [tmp_path / "scifact.model.listwise.trec"], paired=PAIRED)
    run = client.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.experiment_id == exp
    assert run.data.metrics["scifact.listwise.ndcg_at_10"] == 0.66
    assert {a.path for a in client.list_artifacts(rid)} == {"paired_tests.json", "results", "runs"}
    assert "| scifact | 3 | retrieval | 0.6100 |" in (export / "README.md").read_text()
    # an unreachable store costs a warning, not the evaluation
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    (export / "e2rank.json").write_text(json.dumps(_info(tracking_uri="http://127.0.0.1:9")))
    assert record(export, {"scifact": RES}, tracking_uri="http://127.0.0.1:9/") is None
