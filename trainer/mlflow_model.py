"""An export as an MLflow model: a pyfunc around `Reranker` that serving and registry workflows can pick up.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")          # or "models:/<name>/<version>"
    docs = model.predict(["Aspirin lowers the risk of heart attacks."])                    # [n, dim] float32
    queries = model.predict(["does aspirin help"], params={"kind": "query", "source": "scifact"})

Input: a list of strings (or a one-column DataFrame of them). Params: `kind` (document | query | listwise) and
`source` (the instruction-table entry for queries and listwise prompts; "" = the default instructions). `listwise`
reads each text as a JSON object {"query": ..., "documents": [...]} and returns the embedding of its PRF prompt, to
score the documents by cosine (E2Rank reranking). The export folder itself travels as the model's `export` artifact,
so the downloaded model is also a plain transformers and sentence-transformers folder (trainer/st_export.py).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODE = ("common", "data_pipeline", "trainer")  # what `Reranker` imports; shipped with the model
REQUIREMENTS = ("torch", "transformers", "tokenizers", "numpy", "pyyaml", "safetensors")
KINDS = ("document", "query", "listwise")

try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # the class is only needed where MLflow is installed
    _Base = object


class E2RankPyfunc(_Base):
    def load_context(self, context) -> None:
        from data_pipeline.instructions import InstructionTable
        from evaluation.reranker import Reranker

        self.reranker = Reranker.from_pretrained(context.artifacts["export"])
        self.table = InstructionTable.load()

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        kind, source = params.get("kind") or "document", params.get("source") or None
        if kind not in KINDS:
            raise ValueError(f"params.kind must be one of {KINDS}, got {kind!r}")
        texts = list(model_input.iloc[:, 0]) if hasattr(model_input, "columns") else list(model_input)
        ins = self.table.lookup(source, allow_unknown=True)
        if kind == "document":
            return self.reranker.embed(texts)
        if kind == "query":
            return self.reranker.embed_queries(texts, ins.query[0])
        items = []
        for i, t in enumerate(texts):
            try:
                item = json.loads(t)
                items.append((item["query"], list(item["documents"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"listwise input {i}: expected JSON {{'query': str, 'documents': [str, ...]}} "
                                 f"({type(e).__name__}: {e})") from e
        return self.reranker.embed_prompts([q for q, _ in items], [d for _, d in items], ins.rerank)


def signature(dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
                          params=ParamSchema([ParamSpec("kind", "string", "document"),
                                              ParamSpec("source", "string", "")]))


def log(export: Path, register_as: str = "", name: str = "model"):
    """Log `export` to the active run as an MLflow model (and register it when `register_as` is set); returns the
    ModelInfo (model_uri, registered_model_version)."""
    import mlflow

    dim = json.loads((export / "config.json").read_text())["hidden_size"]
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(ROOT / "trainer" / "mlflow_entry.py"), artifacts={"export": str(export)},
        code_paths=[str(ROOT / c) for c in CODE], signature=signature(dim),
        pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS],  # pinned: no slow inference at log time
        registered_model_name=register_as or None,
    )
