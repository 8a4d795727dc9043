"""Inference: embed texts, queries and listwise prompts with an exported E2Rank model, and rerank.

Uses the training contracts as they are: text -> tokens from data_pipeline/text.py, pooling from modeling/embedding.py.
So a prompt built here is byte-for-byte the prompt the model was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.pretrained import load_tokenizer, resolve
from common.typed_config import from_dict
from data_pipeline.text import QUERY_TEMPLATE, TextEncoder, TokenizationConfig, native_query_template
from modeling import distributed as D
from modeling.chunking import assign_chunks, plan_chunks
from modeling.embedding import embed, is_causal, left_pad, native_bf16
from modeling.export_format import EXPORT_INFO

log = logging.getLogger(__name__)
LENGTHS = ("query_max_len", "doc_max_len", "prompt_max_len")
# Real/padded floor of an inference chunk. Lengths pad to a multiple of 8, so with training's old 0.95 texts of 17-35
# tokens mostly got a forward of 1-3 each: the main job's 530 held-out documents took 271 forwards and 17-18 s on 2
# cores, against 4.3-5.9 s at 0.6 (queries 6.3-6.7 -> 1.0-1.4 s; bench/README.md "Evaluation chunks")
INFERENCE_CHUNK_EFFICIENCY = 0.6


class NotAnExport(ValueError):
    pass


def clamp_lengths(tok_cfg: TokenizationConfig, max_positions: int | None) -> TokenizationConfig:
    """Token limits that fit the model's position table (a 512-position encoder cannot read a 2048-token prompt):
    each limit above it is lowered to it, with a warning."""
    if not max_positions:
        return tok_cfg
    over = {k: getattr(tok_cfg, k) for k in LENGTHS if getattr(tok_cfg, k) > max_positions}
    if not over:
        return tok_cfg
    log.warning("the model has %d positions: lowering %s to %d", max_positions,
                ", ".join(f"{k}={v}" for k, v in over.items()), max_positions)
    d = {**tok_cfg.__dict__, **{k: max_positions for k in over}}
    if d["prompt_max_len"] <= d["query_max_len"]:
        d["query_max_len"] = d["prompt_max_len"] // 2
    return from_dict(TokenizationConfig, d)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (modeling/embedding.py native_bf16), else fp32. Embeddings and
    similarities are fp32 either way."""
    return torch.bfloat16 if native_bf16(device.type == "cuda") else torch.float32


class Reranker:
    def __init__(self, model, text: TextEncoder, pooling: str, batch_size: int = 32, device: str | None = None,
                 encode=None, chunk_tokens: int = 8192, shard: tuple[int, int] = (0, 1)):
        """`encode(ids, mask) -> embeddings` replaces the model's forward (the trainer passes its DeepSpeed engine,
        so periodic evaluation runs on the partitioned ZeRO-3 model, every rank in step). Texts are encoded in
        length-sorted chunks of at most `batch_size` sequences and `chunk_tokens` padded tokens, each at least
        INFERENCE_CHUNK_EFFICIENCY real. `shard=(rank, world)`: every rank of a process group calls with the same
        texts, encodes its share of the chunks and gets every embedding back (the trainer's dev evaluation: each rank
        does 1/world of the work, not all of it)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval() if model is not None else None
        causal = is_causal(model) if model is not None else None
        self.encode = encode or (lambda ids, mask: embed(self.model, ids, mask, self.pooling, causal=causal))
        self.text = text
        self.pooling = pooling
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.dtype = next(model.parameters()).dtype if model is not None else None
        self.query_format = "e2rank" if text.cfg.query_template == QUERY_TEMPLATE else text.cfg.query_template
        self.rank, self.world = shard
        self.forward_calls = 0  # sequences this process encoded (tests: cached documents are not re-encoded)
        self._doc_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, tracking_uri: str | None = None, **kw) -> Reranker:
        """An export written by the trainer (it holds e2rank.json: pooling and text format): a folder, an MLflow model
        the trainer logged (`runs:/<run_id>/model`, `models:/<name>/<version>`) or another artifact URI, downloaded
        from `tracking_uri` (default: MLFLOW_TRACKING_URI).

        The same export in sentence-transformers (trainer/st_export.py), for the retrieval mode:
            SentenceTransformer(folder).encode(documents); .encode_query(queries, prompt_name="scifact")
        The listwise (PRF prompt) mode is here: rerank(query, documents, instruction), or embed_prompts(...)."""
        if str(path).startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            from contextlib import nullcontext

            import mlflow
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            # MLflow 3 resolves runs:/<id>/<model name> through the logged-model search of the *current* store, not
            # the tracking_uri argument: use that store for the call only (nothing leaks to later MLflow use)
            with _use_tracking_uri(tracking_uri) if tracking_uri else nullcontext():
                path = mlflow.artifacts.download_artifacts(artifact_uri=str(path), tracking_uri=tracking_uri)
        p = Path(path)
        if (p / "MLmodel").is_file():  # an MLflow model the trainer logged (trainer/mlflow_model.py): its export
            import yaml

            arts = yaml.safe_load((p / "MLmodel").read_text())["flavors"]["python_function"].get("artifacts", {})
            if "export" in arts:
                p = p / arts["export"]["path"]
        info_path = p / EXPORT_INFO
        if not info_path.is_file():
            raise NotAnExport(
                f"{p} is not an E2Rank export (no {EXPORT_INFO}); export one with the trainer, or use "
                "Reranker.from_base(path, pooling=...) to evaluate a plain Hugging Face model"
            )
        info = json.loads(info_path.read_text())
        tok_cfg = from_dict(TokenizationConfig, {**info["text_format"], "tokenizer": str(p)})
        return cls._load(str(p), tok_cfg, info["pooling"], **kw)

    @classmethod
    def from_base(cls, path: str, pooling: str = "last", tokenization: TokenizationConfig | None = None,
                  query_format: str = "native", **kw):
        """A plain model (the zero-shot baseline), with the same text contract as training. query_format: `e2rank`
        (the instruction format training uses), `native` (the model's own: text.py native_query_template) or
        `plain` (the bare query)."""
        folder = str(resolve(path, weights=True))
        tok_cfg = tokenization or TokenizationConfig()
        fixed = {"e2rank": QUERY_TEMPLATE, "plain": "{query}"}
        if query_format not in (*fixed, "native"):
            raise ValueError(f"query_format must be e2rank, native or plain, got {query_format!r}")
        template = fixed.get(query_format, QUERY_TEMPLATE)
        tok_cfg = from_dict(TokenizationConfig, {**tok_cfg.__dict__, "tokenizer": folder, "query_template": template})
        r = cls._load(folder, tok_cfg, pooling, **kw)
        r.query_format = query_format
        if query_format == "native":
            template, r.query_format = native_query_template(folder, is_causal(r.model))
            tok_cfg = from_dict(TokenizationConfig, {**r.text.cfg.__dict__, "query_template": template})
            r.text = TextEncoder(r.text.tok, tok_cfg)
        return r

    @classmethod
    def _load(cls, folder: str, tok_cfg: TokenizationConfig, pooling: str, dtype: str = "auto", **kw) -> Reranker:
        """dtype: auto (bf16 where the hardware has it, see inference_dtype), bf16 or fp32."""
        from transformers import AutoModel

        dev = torch.device(kw.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = {"auto": inference_dtype(dev), "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        model = AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=dt)
        tok_cfg = clamp_lengths(tok_cfg, getattr(model.config, "max_position_embeddings", None))
        return cls(model, TextEncoder(load_tokenizer(folder), tok_cfg), pooling, **kw)

    # -- encoding ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_ids(self, seqs: Sequence[np.ndarray], progress=None) -> np.ndarray:
        """Length-grouped chunks (modeling/chunking.py: little padding), results in input order. Sharded: this rank's
        chunks, then a sum across ranks fills in the rest. Ranks with fewer chunks run a 1-token forward per missing
        chunk, since under ZeRO-3 every forward is a collective."""
        plan = plan_chunks([len(s) for s in seqs], self.chunk_tokens, min_efficiency=INFERENCE_CHUNK_EFFICIENCY)
        plan = [c[i : i + self.batch_size] for c in plan for i in range(0, len(c), self.batch_size)]
        if not plan:
            return np.zeros((len(seqs), 0), np.float32)
        shares = assign_chunks([len(c) * max(len(seqs[j]) for j in c) for c in plan], self.world)
        mine = [plan[j] for j in shares[self.rank]]
        if progress is not None:  # a tqdm bar counting this rank's tokens
            progress.reset(total=sum(len(seqs[j]) for c in mine for j in c))
        out = None
        for k in range(max(len(s) for s in shares)):
            filler = k >= len(mine)  # one token of the first sequence; its embedding is dropped
            idx = [] if filler else mine[k]
            ids, mask = left_pad([seqs[plan[0][0]][:1]] if filler else [seqs[j] for j in idx], self.text.pad_id, 8)
            e = self.encode(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(seqs), e.shape[1]), np.float32)
            if not filler:
                out[idx] = e
                self.forward_calls += len(idx)
                if progress is not None:
                    progress.update(sum(len(seqs[j]) for j in idx))
        if self.world > 1:
            out = D.sum_across(torch.from_numpy(out)).numpy()
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Documents (text + EOS)."""
        return self._encode_ids(self.text.encode_documents(list(texts)))

    def embed_documents(self, docs: dict[str, str], progress=None) -> dict[str, np.ndarray]:
        """Documents by id, each encoded once per model (cached)."""
        todo = [d for d in docs if d not in self._doc_cache]
        if todo:
            embs = self._encode_ids(self.text.encode_documents([docs[d] for d in todo]), progress)
            self._doc_cache.update(zip(todo, embs))
        return {d: self._doc_cache[d] for d in docs}

    def embed_queries(self, queries: Sequence[str], instruction: str, progress=None) -> np.ndarray:
        return self._encode_ids(self.text.encode_queries(list(queries), [instruction] * len(queries)), progress)

    def embed_prompts(
        self, queries: Sequence[str], slates: Sequence[Sequence[str]], instruction: str, progress=None
    ) -> np.ndarray:
        prompts = [
            ids
            for ids, _ in self.text.encode_listwise(
                list(queries), [list(s) for s in slates], [instruction] * len(queries)
            )
        ]
        return self._encode_ids(prompts, progress)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str,
        top_k_prompt: int = 20,
        doc_embeddings: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """E2Rank listwise reranking: the prompt holds the first `top_k_prompt` documents (in the given order);
        every document is scored by cosine to the prompt's embedding. Pass the retrieval embeddings of the documents
        to skip encoding them (one prompt forward plus a matmul). Returns (scores, order best first)."""
        if not documents:
            raise ValueError("rerank: empty candidate list")
        d = doc_embeddings if doc_embeddings is not None else self.embed(documents)
        p = self.embed_prompts([query], [list(documents[:top_k_prompt])], instruction)[0]
        scores = d @ p
        return scores, np.argsort(-scores, kind="stable")
