"""The dev set during training (torchtitan's validator): both scoring modes with the live, partitioned engine,
each rank encoding 1/world of the texts."""

from __future__ import annotations

import logging

import torch

from common.pretrained import load_tokenizer
from common.typed_config import from_dict
from data_pipeline.text import TextEncoder, TokenizationConfig
from modeling import distributed as D

from .config import TrainConfig
from .preflight import Plan

log = logging.getLogger(__name__)


class Validator:
    """The dev set (torchtitan's validator): loaded once per run on first use (set, instructions, text encoder), then
    NDCG@10 / MRR@10 / Recall@100 of both scoring modes with the live (partitioned) engine."""

    def __init__(self, cfg: TrainConfig, plan: Plan):
        self.cfg, self.plan, self._loaded = cfg, plan, None

    def should_run(self, step: int, max_steps: int) -> bool:
        """Every eval.every steps, and at the run's last step."""
        every = self.cfg.eval.every
        return bool(every) and (step % every == 0 or step == max_steps)

    def _load(self):
        from data_pipeline.instructions import InstructionTable
        from evaluation.readers import load_eval_set

        e, plan = self.cfg.eval, self.plan
        es = load_eval_set(e.data, qrels=e.qrels or None, split=e.split, run=e.run or None, max_queries=e.max_queries)
        tok_cfg = from_dict(
            TokenizationConfig, {**plan.manifest["config"]["tokenization"], "tokenizer": plan.model_path}
        )
        return (
            es,
            InstructionTable.load().lookup(e.source or es.name, allow_unknown=True),
            TextEncoder(load_tokenizer(plan.model_path), tok_cfg),
        )

    def __call__(self, engine) -> dict[str, float]:
        from evaluation.reranker import Reranker
        from evaluation.scoring import evaluate

        self._loaded = self._loaded or self._load()
        es, ins, text = self._loaded
        rer = Reranker(
            None,
            text,
            self.cfg.model.pooling,
            device=str(engine.device),
            encode=lambda ids, mask: engine(ids, mask),
            shard=D.world(),
        )  # each rank 1/world of it
        engine.eval()
        with torch.no_grad():
            res = evaluate(
                rer,
                es,
                query_instruction=ins.query[0],
                rerank_instruction=ins.rerank,
                prompt_k=self.cfg.eval.prompt_k,
                progress=False,
            )
        engine.train()
        out = {
            f"dev_{mode}_{k.lower().replace('@', '_at_')}": v
            for mode in ("retrieval", "listwise")
            for k, v in res[mode].items()
        }
        log.info("[eval] " + " ".join(f"{k}={v:.4f}" for k, v in out.items()))
        return out
