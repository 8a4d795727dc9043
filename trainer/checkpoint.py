"""Checkpoints that are complete or invisible, exact resume, and the consolidated Hugging Face export.

Layout of output_dir/checkpoints: one folder per step (DeepSpeed's sharded engine state + per-rank RNG states +
trainer_state.json with the loader cursor and the MLflow run id) and a `latest` file that names the newest complete
one. Every rank writes into `<tag>.partial`; after a barrier rank 0 renames it to `<tag>` and then points `latest`
at it (temp name + rename). A save killed or out of space at any point leaves a `.partial` folder that nothing
reads and the next start removes, and `latest` still names the previous complete checkpoint.

A checkpoint written by N ranks resumes on M != N ranks through DeepSpeed's universal checkpoint format
(`deepspeed.checkpoint.ds_to_universal`, which merges the ZeRO partitions of weights and Adam moments into one
file per parameter): rank 0 converts it once, into `<tag>.universal`, and every rank loads its new partition.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling import distributed as D
from modeling.export_format import EXPORT_INFO

log = logging.getLogger(__name__)


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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the folder and what to do."""


PARTIAL, UNIVERSAL = ".partial", ".universal"


@contextlib.contextmanager
def _no_zip_crc32():
    """torch.save without the zip CRC32 of every record (torch.serialization.set_crc32_options): torch.load never
    checks it, and computing it took 2-6 s of a 1.9 GB SmolLM2-135M ZeRO-0 checkpoint that writes in ~1 s without
    (bench/README.md). A checkpoint's completeness is the temp name + rename below, not the CRC."""
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(was)


def save(engine, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """All ranks. `keep` > 0: then remove all but the newest `keep` complete checkpoints (prune)."""
    tag = f"step{step:08d}"
    rank, world = D.world()
    part = ckpt_dir / (tag + PARTIAL)
    try:
        with _no_zip_crc32():
            engine.save_checkpoint(str(ckpt_dir), tag=part.name, save_latest=False)
            torch.save(_rng_state(), part / f"rng_rank{rank}.pt")
        if rank == 0:
            (part / "trainer_state.json").write_text(json.dumps({**state, "step": step, "world_size": world}, indent=1))
        D.barrier()
        if rank == 0:
            if (ckpt_dir / tag).exists():  # written by a run that died before pointing `latest` at it
                shutil.rmtree(ckpt_dir / tag)
            part.replace(ckpt_dir / tag)
            tmp = ckpt_dir / f".latest.tmp{os.getpid()}"
            tmp.write_text(tag)
            tmp.replace(ckpt_dir / "latest")
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as "unexpected pos ..." (errno lost): judge by the space a checkpoint needs
        free, prev = shutil.disk_usage(ckpt_dir).free, latest(ckpt_dir)
        need = sum(f.stat().st_size for f in (ckpt_dir / prev).rglob("*") if f.is_file()) if prev else 64 * 2**20
        full = getattr(e, "errno", None) == errno.ENOSPC or free < need
        why = (f"the disk is full ({free / 2**20:.1f} MiB free, a checkpoint takes {need / 2**20:.1f} MiB)" if full
               else f"{type(e).__name__}: {e}")
        raise CheckpointError(
            f"checkpoint {ckpt_dir / tag} could not be written: {why}. It is left as {part.name} and ignored; "
            f"the last complete checkpoint is {prev or 'none'}. " + ("Free space, then re-run the same command to "
            "resume from it." if full else "Re-run the same command to resume from it.")
        ) from e
    if rank == 0:  # after `latest` names the new one; a failed removal is not a failed save, and raising here on
        try:  # rank 0 alone would leave the other ranks waiting at the barrier below
            prune(ckpt_dir, keep)
        except OSError as e:
            log.warning("[checkpoint] saved %s, but removing older checkpoints in %s failed (%s: %s); they are kept",
                        ckpt_dir / tag, ckpt_dir, type(e).__name__, e)
    D.barrier()
    return ckpt_dir / tag


def clean(ckpt_dir: Path) -> list[str]:
    """Rank 0, at start: remove what interrupted saves and conversions left (never a complete checkpoint)."""
    gone = []
    for p in sorted(ckpt_dir.glob(f"*{PARTIAL}")) + sorted(ckpt_dir.glob(".latest.tmp*")) + \
            sorted(ckpt_dir.glob(f"*{UNIVERSAL}.tmp*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        gone.append(p.name)
    return gone


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Rank 0: remove complete checkpoints (and their universal conversions) older than the newest `keep`; never
    the one `latest` names. keep <= 0 keeps all."""
    if keep <= 0:
        return []
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")
                  and p.name[4:].isdigit())
    current, gone = latest(ckpt_dir), []
    for tag in tags[:-keep]:
        if tag == current:
            continue
        for p in (ckpt_dir / tag, ckpt_dir / (tag + UNIVERSAL)):
            if p.exists():
                shutil.rmtree(p)
        gone.append(tag)
    return gone


def latest(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (ckpt_dir / tag / "trainer_state.json").is_file() else None


def trainer_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / "trainer_state.json").read_text())


def saved_world(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> int:
    """Ranks that wrote the checkpoint (from its state, or counted from its RNG files for older checkpoints)."""
    return int(state.get("world_size") or len(list((ckpt_dir / tag).glob("rng_rank*.pt"))))


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Rank 0: convert `tag` to DeepSpeed's universal format once (temp name + rename); returns the new tag."""
    out = ckpt_dir / (tag + UNIVERSAL)
    if not (out / "zero").is_dir():
        tmp = ckpt_dir / f"{tag}{UNIVERSAL}.tmp{os.getpid()}"
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n{r.stderr[-2000:]}")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    return out.name


def load(engine, ckpt_dir: Path, tag: str, universal: bool = False) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and this rank's RNG; returns the trainer state. With
    `universal` (another world size), the engine was built with checkpoint.load_universal and reads
    `<tag>.universal`; a rank the old run did not have keeps its seeded RNG."""
    rank, _ = D.world()
    try:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag + UNIVERSAL if universal else tag)
    except KeyError as e:
        if e.args != ("lr_lambdas",):
            raise
        # checkpoints written before trainer/schedule.py hold WarmupDecayLR's state, which LambdaLR cannot take
        raise CheckpointError(f"{ckpt_dir / tag} was written with the old LR schedule (DeepSpeed WarmupDecayLR, before "
                              "2026-11-29) and cannot resume under trainer/schedule.py; train from its export "
                              "(model.path) or start in an empty run.output_dir") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    elif not universal:
        raise CheckpointError(f"{rng} is missing: the checkpoint is incomplete")
    return trainer_state(ckpt_dir, tag)


def zero0_state_dict(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The fp32 weights of a ZeRO-0 checkpoint, which deepspeed's zero_to_fp32 cannot read: nothing is partitioned,
    the module's weights are in the model states file, and under bf16 the fp32 master weights are the optimizer's
    `fp32_groups`, in the order of the parameters it was given (the module's, every one trainable)."""
    sd = torch.load(Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = sd["module"]
    buffers = set(sd.get("buffer_names") or [])
    names = [k for k in module if k not in buffers]
    optim = sd.get("optimizer") if isinstance(sd.get("optimizer"), dict) else {}
    masters = [t for group in optim.get("fp32_groups") or [] for t in group]
    state = {k: v.float() for k, v in module.items()}
    if masters:
        if len(masters) != len(names) or any(m.numel() != module[n].numel() for m, n in zip(masters, names)):
            raise RuntimeError(f"export: the fp32 master weights of {ckpt_dir / tag} do not line up with the module's "
                               f"parameters ({len(masters)} masters, {len(names)} parameters)")
        state.update({n: m.detach().float().view_as(module[n]) for n, m in zip(names, masters)})
    return state


def export(ckpt_dir: Path, tag: str, model_path: str, tokenizer_path: str, out: Path, info: dict[str, Any],
           card_config: dict[str, Any] | None = None) -> Path:
    """Consolidate a ZeRO checkpoint into a folder that plain `transformers.AutoModel` and `SentenceTransformer` load
    (rank 0 only; trainer/st_export.py)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if trainer_state(ckpt_dir, tag).get("zero_stage") == 0:  # the stage the trainer recorded with the checkpoint
        state = zero0_state_dict(ckpt_dir, tag)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    config = AutoConfig.from_pretrained(model_path)
    model = AutoModel.from_config(config)
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export: checkpoint does not match the backbone (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    from .st_export import add_to_export

    add_to_export(tmp)  # also a sentence-transformers model
    if card_config is not None:
        from modeling.model_card import write as write_card

        write_card(tmp, info, card_config)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out
