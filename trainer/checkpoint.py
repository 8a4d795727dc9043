"""Checkpoints that are complete or invisible, exact resume, and the consolidated Hugging Face export.

Layout of output_dir/checkpoints: one folder per step (DeepSpeed's sharded engine state + per-rank RNG states +
trainer_state.json with the loader cursor and the MLflow run id) and a `latest` file that names the newest complete
one. `latest` is written last, by rank 0, after a barrier, via a temp name and a rename.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import distributed as D

EXPORT_INFO = "e2rank.json"


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, ckpt_dir: Path, step: int, state: dict[str, Any]) -> Path:
    tag = f"step{step:08d}"
    rank, _ = D.world()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        (ckpt_dir / tag / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _barrier()
    if rank == 0:
        tmp = ckpt_dir / f".latest.tmp{os.getpid()}"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
    _barrier()
    return ckpt_dir / tag


def latest(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (ckpt_dir / tag / "trainer_state.json").is_file() else None


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule), this rank's RNG; returns the trainer state."""
    rank, _ = D.world()
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if not rng.is_file():
        raise RuntimeError(f"{rng} is missing: the checkpoint was written by a different number of ranks")
    _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((ckpt_dir / tag / "trainer_state.json").read_text())


def export(ckpt_dir: Path, tag: str, model_path: str, tokenizer_path: str, out: Path, info: dict[str, Any]) -> Path:
    """Consolidate a ZeRO checkpoint into a folder that plain `transformers.AutoModel` loads (rank 0 only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    config = AutoConfig.from_pretrained(model_path)
    model = AutoModel.from_config(config)
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export: checkpoint does not match the backbone (missing {missing[:5]}, unexpected {unexpected[:5]})")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out
