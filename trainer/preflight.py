"""Checks that need no process group, run on every rank before anything trains (so every rank stops alike), and
what they resolve: the model folder, the shards' manifest (read once per run) and the tokenizer fingerprint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.mlflow_access import TrackingAccessError, check_access
from common.pretrained import load_tokenizer, resolve
from common.typed_config import from_dict
from data_pipeline.shards import read_manifest
from data_pipeline.text import TextEncoder, TokenizationConfig

from .config import TrainConfig


class PreflightError(ValueError):
    """Something to fix before training can start; the message says what."""


@dataclass
class Plan:
    model_path: str
    manifest: dict[str, Any]
    fingerprint: str


def preflight(cfg: TrainConfig, world_size: int) -> Plan:
    """Checks that need no process group, changing nothing: model path, shards vs tokenizer, batch divisibility.
    Returns what they resolved (the model folder, the manifest, read once per run, and the tokenizer fingerprint)."""
    try:  # every rank asks, so every rank stops alike (no rank left waiting at a collective)
        check_access(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    except TrackingAccessError as e:
        raise PreflightError(f"tracking: {e}") from e
    try:
        model_path = str(resolve(cfg.model.path, weights=True))
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(f"model.path: {e}") from e
    if not (Path(model_path) / "config.json").is_file():
        raise PreflightError(f"model.path {model_path} has no config.json: not a Hugging Face model folder")
    kind = "contrastive" if cfg.stage == 1 else "listwise"
    try:
        manifest = read_manifest(cfg.shards, kind=kind, local_shards=not cfg.loader.stream_url)
    except Exception as e:
        raise PreflightError(f"shards: {e}") from e
    tok_cfg = from_dict(TokenizationConfig, {**manifest["config"]["tokenization"], "tokenizer": model_path})
    fp = TextEncoder(load_tokenizer(model_path), tok_cfg).fingerprint()
    if fp != manifest["tokenizer"]["fingerprint"]:
        raise PreflightError(
            f"shards in {cfg.shards} were tokenized with {manifest['tokenizer']['name']}, not this model's tokenizer "
            f"({cfg.model.path}); re-run the pipeline with tokenization.tokenizer={cfg.model.path}"
        )
    if cfg.run.global_batch_size:
        per = world_size * cfg.loader.grad_accum
        if cfg.run.global_batch_size % per:
            raise PreflightError(
                f"run.global_batch_size={cfg.run.global_batch_size} does not divide across {world_size} ranks x "
                f"{cfg.loader.grad_accum} accumulation steps; use a multiple of {per}"
            )
    return Plan(model_path, manifest, fp)
