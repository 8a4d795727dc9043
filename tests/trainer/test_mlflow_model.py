"""trainer/mlflow_model.py: an export logged and registered as an MLflow model predicts the Reranker's embeddings
(a real sqlite store here; the trainer against a real `mlflow server`: tests/trainer/test_trainer.py)."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from data_pipeline.instructions import InstructionTable
from data_pipeline.text import TokenizationConfig
from evaluation.reranker import Reranker
from tests.trainer_fixtures import make_tiny_model
from trainer.st_export import add_to_export

DOCS = ["Aspirin lowers the risk of heart attacks.", "The mitochondrion is the powerhouse of the cell."]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    d = tmp_path_factory.mktemp("mlflow_model")
    export = make_tiny_model(d / "export")
    cfg = TokenizationConfig(tokenizer=str(export), query_max_len=64, doc_max_len=64, prompt_max_len=256)
    (export / "e2rank.json").write_text(json.dumps({"pooling": "last", "normalize": True, "text_format": asdict(cfg)}))
    add_to_export(export)
    from trainer.mlflow_model import log

    with _use_tracking_uri(f"sqlite:///{d / 'mlflow.db'}"):
        mlflow.create_experiment("t", artifact_location=(d / "art").as_uri())
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("t").experiment_id) as run:
            info = log(export, register_as="e2rank-tiny")
        assert info.registered_model_version == 1
        models = {u: mlflow.pyfunc.load_model(u) for u in (f"runs:/{run.info.run_id}/model", "models:/e2rank-tiny/1")}
        # Reranker.from_pretrained on a model URI finds the export inside the downloaded MLflow model
        yield models, Reranker.from_pretrained(export), Reranker.from_pretrained(f"runs:/{run.info.run_id}/model")


def test_runs_and_models_uris_predict_the_rerankers_embeddings_in_each_mode(logged):
    models, rer, _ = logged
    table = InstructionTable.load()
    listwise = [json.dumps({"query": "aspirin", "documents": DOCS})]
    for m in models.values():
        assert np.allclose(m.predict(DOCS), rer.embed(DOCS), atol=1e-5)
        q = m.predict(["does aspirin help"], params={"kind": "query", "source": "scifact"})
        assert np.allclose(q, rer.embed_queries(["does aspirin help"], table.sources["scifact"].query[0]), atol=1e-5)
        p = m.predict(listwise, params={"kind": "listwise"})
        assert np.allclose(p, rer.embed_prompts(["aspirin"], [DOCS], table.default.rerank), atol=1e-5)
        assert m.metadata.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 64], (-1, 64))


def test_bad_inputs_are_refused_with_the_reason(logged):
    m = next(iter(logged[0].values()))
    with pytest.raises(Exception, match="params.kind must be one of"):
        m.predict(DOCS, params={"kind": "passage"})
    with pytest.raises(Exception, match="listwise input 1: expected JSON"):
        m.predict([json.dumps({"query": "q", "documents": DOCS}), "not json"], params={"kind": "listwise"})


def test_the_reranker_loads_the_logged_model_uri(logged):
    _, rer, again = logged
    assert np.allclose(again.embed(DOCS), rer.embed(DOCS), atol=1e-6)
