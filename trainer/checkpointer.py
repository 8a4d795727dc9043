"""When and how the Trainer checkpoints: the checkpoint to resume from (converted when the number of ranks changed),
saves every run.save_every steps and at the end, and the final export. The file format is trainer/checkpoint.py."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.typed_config import to_dict
from modeling import distributed as D
from modeling import model_card

from . import checkpoint as C
from .config import TrainConfig
from .loader import LoaderConfig
from .preflight import Plan, PreflightError
from .stream import make_loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    tag: str | None  # None: a fresh run
    reshard: bool  # written by another number of ranks: loaded as a universal checkpoint
    zero_stage: int | None  # the stage it was written with (resolved, for zero_stage auto)
    loader: LoaderConfig  # the loader settings of this run: the checkpoint's global batch kept across world sizes


class Checkpointer:
    def __init__(self, cfg: TrainConfig, plan: Plan, out: Path, rank: int, world: int):
        self.cfg, self.plan, self.out, self.rank, self.world = cfg, plan, out, rank, world
        self.dir = out / "checkpoints"

    def should_save(self, step: int, last: int) -> bool:
        return step % self.cfg.run.save_every == 0 or step == last

    def find(self, loader: LoaderConfig) -> Resume:
        """The checkpoint to resume from, and whether it was written by another number of ranks. Then the global
        batch is kept (per-rank batch size adjusted, or a clear error) and rank 0 converts it to DeepSpeed's
        universal format, which every rank re-partitions on load (node loss is the common case on clusters)."""
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if gone := C.clean(self.dir):
                log.warning("[train] removed what an interrupted save left: %s", ", ".join(gone))
        D.barrier()
        tag = C.latest(self.dir)
        state = C.trainer_state(self.dir, tag) if tag else {}
        was = state.get("zero_stage", state.get("config", {}).get("deepspeed", {}).get("zero_stage"))
        stage = was if isinstance(was, int) else None
        now = self.cfg.deepspeed.zero_stage
        if tag and stage is not None and now != "auto" and stage != now:
            # the optimizer states are partitioned differently per stage: loading one into the other is not a resume
            raise PreflightError(
                f"checkpoint {self.dir / tag} was written with DeepSpeed ZeRO-{was} and this run asks for "
                f"ZeRO-{now}: resume it with deepspeed.zero_stage={was}, or start in another run.output_dir")
        if not tag or (old := C.saved_world(self.dir, tag, state)) == self.world:
            return Resume(tag, False, stage, loader)
        saved = state["loader"]["config"]
        g = saved["batch_size"] * old * saved["grad_accum"]
        if loader.batch_size * self.world * loader.grad_accum != g:
            if g % (self.world * loader.grad_accum):
                raise PreflightError(
                    f"checkpoint {tag} was written by {old} ranks with a global batch of {g}; it does not divide "
                    f"across {self.world} ranks x loader.grad_accum={loader.grad_accum}: set loader.grad_accum so "
                    f"that {self.world} x grad_accum divides {g}")
            loader = dataclasses.replace(loader, batch_size=g // (self.world * loader.grad_accum))
        log.info("[train] resuming %s (written by %d ranks) on %d: global batch %d kept as loader.batch_size=%d x "
                 "%d ranks x grad_accum=%d; converting to a universal checkpoint", tag, old, self.world, g,
                 loader.batch_size, self.world, loader.grad_accum)
        if self.rank == 0:
            C.to_universal(self.dir, tag)
        D.barrier()
        return Resume(tag, True, stage, loader)

    def load(self, engine, resume: Resume) -> dict[str, Any]:
        return C.load(engine, self.dir, resume.tag, universal=resume.reshard)

    def save(self, engine, step: int, state: dict[str, Any]) -> Path:
        return C.save(engine, self.dir, step, state, keep=self.cfg.run.keep_checkpoints)

    def latest(self) -> str | None:
        return C.latest(self.dir)

    def export(self, engine, loader: LoaderConfig, tag: str, run: dict[str, Any] | None = None) -> Path:
        """Rank 0 consolidates checkpoint `tag` into a Hugging Face folder with the E2Rank and sentence-transformers
        files and a model card; every rank encodes a probe batch so the export can be checked against it."""
        cfg, plan = self.cfg, self.plan
        probe = next(iter(make_loader(cfg.shards, loader, rank=0, world_size=1, manifest=plan.manifest)))
        engine.eval()
        with torch.no_grad():
            emb = engine(probe["doc_input_ids"].to(engine.device), probe["doc_attention_mask"].to(engine.device))
        engine.train()
        export_dir = self.out / "export"
        if D.is_main():
            mf = plan.manifest["config"]["tokenization"]
            base, earlier = model_card.lineage(plan.model_path)
            data = model_card.data_summary(plan.manifest, (Path(cfg.shards) / "manifest.json").read_bytes())
            info = {"pooling": cfg.model.pooling, "normalize": True, "text_format": mf,
                    "eos_id": plan.manifest["tokenizer"]["eos_id"], "tokenizer_fingerprint": plan.fingerprint,
                    "stage": cfg.stage, "checkpoint": str(self.dir / tag),
                    "base_model": cfg.model.path if not earlier else base, "data": data, "previous_stages": earlier,
                    **(run or {})}
            C.export(self.dir, tag, plan.model_path, plan.model_path, export_dir, info, card_config=to_dict(cfg))
            torch.save({"input_ids": probe["doc_input_ids"], "attention_mask": probe["doc_attention_mask"],
                        "embeddings": emb}, self.out / "probe_embeddings.pt")
        D.barrier()
        return export_dir
