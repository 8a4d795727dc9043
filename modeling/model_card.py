"""The export's model card (`README.md`, Hugging Face conventions: YAML front matter, then prose).

It says what the model is (base, stages and steps, pooling, text format), what it was trained on (each stage's data
manifest with its input files' SHA-256), the resolved config, where the MLflow run is, how to load it three ways,
and, once an evaluation ran, its table and paired tests (`set_evaluation`, between markers, so re-evaluating replaces
the section instead of appending to it). Pure rendering plus one write; the trainer and the evaluation CLI call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

START, END = "<!-- e2rank:evaluation -->", "<!-- /e2rank:evaluation -->"


def data_summary(manifest: dict[str, Any], manifest_bytes: bytes) -> dict[str, Any]:
    """What a stage trained on, small enough for e2rank.json: the manifest's hash, its inputs and totals."""
    return {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "kind": manifest.get("kind"),
            "inputs": [{k: i.get(k) for k in ("path", "records", "sha256")} for i in manifest.get("inputs", [])],
            "shards": len(manifest.get("shards", [])), "samples": manifest.get("totals", {}).get("samples")}


def _stage_rows(info: dict[str, Any]) -> list[str]:
    rows = []
    for s in [*info.get("previous_stages", []), info]:
        d = s.get("data") or {}
        inputs = "; ".join(f"`{Path(i['path']).name}` ({i['records']} records, sha256 `{str(i['sha256'])[:12]}`)"
                           for i in d.get("inputs", [])) or "-"
        rows.append(f"| {s.get('stage')} | {s.get('steps', '-')} | {d.get('samples', '-')} | "
                    f"`{str(d.get('manifest_sha256', '-'))[:12]}` | {inputs} |")
    return rows


def render(info: dict[str, Any], config: dict[str, Any], evaluation: str = "") -> str:
    base = info.get("base_model", "unknown")
    stage = info.get("stage")
    front = {"base_model": base, "library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
             "tags": ["sentence-transformers", "feature-extraction", "text-ranking", "e2rank"]}
    run = info.get("mlflow_run_id")
    tf = info.get("text_format", {})
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# E2Rank embedding model (stage {stage}) from `{base}`", "",
        "An [E2Rank](https://arxiv.org/abs/2510.22733) model: one embedding model that retrieves (cosine of query and "
        "document embeddings) and reranks listwise (the embedding of a prompt holding the query and the top "
        "first-stage documents, used as a pseudo-relevance-feedback query). "
        f"Pooling: `{info.get('pooling')}`, L2-normalised. Texts end with the token id {info.get('eos_id')} "
        f"(documents up to {tf.get('doc_max_len')} tokens, queries {tf.get('query_max_len')}, listwise prompts "
        f"{tf.get('prompt_max_len')}).", "",
        "## Training", "",
        "| stage | steps | samples | data manifest | inputs |", "|---|---|---|---|---|", *_stage_rows(info), "",
        f"MLflow run: `{run}` in `{redact(info.get('tracking_uri'))}`." if run else "No MLflow run was recorded.", "",
        "<details><summary>Resolved training config</summary>", "", "```yaml",
        yaml.safe_dump(config, sort_keys=False).strip(), "```", "</details>", "",
        START, evaluation.strip() or "Not evaluated yet: `python -m evaluation --model <this folder> ...` "
        "adds its table here.", END, "",
        "## Use", "",
        "sentence-transformers (retrieval mode; `prompt_name` picks an instruction, e.g. `scifact`):", "",
        "```python", "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("<this folder>")', 'docs = model.encode(["A document."])',
        'queries = model.encode_query(["a question"])  # the default retrieval instruction', "```", "",
        "transformers (last-token pooling for decoders; append the pooling token as the trainer does):", "",
        "```python", "from transformers import AutoModel, AutoTokenizer", "",
        'tok, model = AutoTokenizer.from_pretrained("<this folder>"), AutoModel.from_pretrained("<this folder>")',
        "```", "",
        "E2Rank's listwise reranking (and the exact text format), with this repository's `Reranker`:", "",
        "```python", "from evaluation.reranker import Reranker", "",
        'r = Reranker.from_pretrained("<this folder>")  # or "runs:/<run_id>/model", "models:/<name>/<version>"',
        "scores, order = r.rerank(query, first_stage_documents, instruction, top_k_prompt=20)", "```", "",
    ]
    return "\n".join(lines)


def write(export: Path, info: dict[str, Any], config: dict[str, Any]) -> Path:
    return _atomic(export / "README.md", render(info, config))


def set_evaluation(export: Path, section: str) -> Path:
    """Replace the card's evaluation section (markdown) with `section`."""
    card = export / "README.md"
    if not card.is_file():
        raise FileNotFoundError(f"{card}: the export has no model card (exported before 2026-12-07?)")
    text = card.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{card}: no evaluation markers {START} ... {END}")
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{section.strip()}\n{END}", text,
                 flags=re.S)
    return _atomic(card, new)


def redact(uri: str | None) -> str | None:
    """A tracking URI without any user:password@ in it (cards are shared; credentials are not)."""
    return re.sub(r"//[^/@]+@", "//***@", uri) if uri else uri


def _atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def lineage(model_path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """The original base model and the earlier stages, read from the e2rank.json of an export we start from."""
    info_path = Path(model_path) / "e2rank.json"
    if not info_path.is_file():
        return str(model_path), []
    prev = json.loads(info_path.read_text())
    earlier = [*prev.get("previous_stages", []), {k: prev.get(k) for k in ("stage", "steps", "data", "mlflow_run_id")}]
    return prev.get("base_model", str(model_path)), earlier
