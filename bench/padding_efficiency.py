"""Real / padded tokens on SciFact, padded micro-batches (the loader's collation) vs the trainer's length-grouped
chunks (modeling/chunking.py), for stage 1 (q512/d512) and stage 2 (16-candidate slates at the stage-2 recipe lengths:
doc 1024, prompt 8192, 480 per candidate), with the real Qwen3 tokenizer.

    python bench/padding_efficiency.py [--chunk-tokens 8192] [--batch1 8] [--batch2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slates(data: Path, out: Path, k: int = 16) -> None:
    """SciFact train: the qrels positive + BM25 candidates, 16 per query (lengths are what matter here)."""
    from data_pipeline.beir import bm25_search
    from evaluation.readers import load_corpus, load_qrels, load_queries

    corpus, queries = load_corpus(data / "corpus.jsonl"), load_queries(data / "queries.jsonl")
    qrels = load_qrels(data / "qrels" / "train.tsv")
    qids = [q for q in sorted(qrels) if q in queries]
    top = bm25_search(corpus, {q: queries[q] for q in qids}, k + 5)
    hits = [top[q] for q in qids]
    with open(out, "w") as f:
        for q, row in zip(qids, hits):
            pos = [c for c in qrels[q] if c in corpus][:1]
            docs = pos + [d for d in row if d not in pos][: k - len(pos)]
            f.write(json.dumps({"query": queries[q], "document": [corpus[d] for d in docs],
                                "ranking": list(range(1, len(docs) + 1)), "source": "scifact"}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--batch1", type=int, default=8)
    ap.add_argument("--batch2", type=int, default=4)
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    from data_pipeline.beir import bm25_contrastive
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run
    from data_pipeline.text import TokenizationConfig
    from modeling.chunking import chunk_view, plan_chunks
    from trainer.loader import LoaderConfig, ShardLoader

    data = Path(args.data)
    tok = str(data / "tokenizers" / "qwen3")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-pad-"))
    work.mkdir(parents=True, exist_ok=True)
    s1, s2 = work / "s1.jsonl", work / "s2.jsonl"
    if not s1.exists():
        bm25_contrastive(data / "scifact", "train", s1, negatives=7, source="scifact")
    if not s2.exists():
        slates(data / "scifact", s2)
    cfgs = {1: TokenizationConfig(tokenizer=tok, query_max_len=512, doc_max_len=512),
            2: TokenizationConfig(tokenizer=tok, query_max_len=512, doc_max_len=1024, prompt_max_len=8192,
                                  prompt_doc_max_len=480)}
    for stage, src in ((1, s1), (2, s2)):
        run(PipelineConfig(kind="contrastive" if stage == 1 else "listwise", inputs=[str(src)],
                           output=str(work / f"shards{stage}"), samples_per_shard=200, tokenization=cfgs[stage],
                           progress=False))
    for stage in (1, 2):
        lc = LoaderConfig(batch_size=args.batch1 if stage == 1 else args.batch2, negatives_per_query=3, slate_size=16)
        loader = ShardLoader(work / f"shards{stage}", lc, rank=0, world_size=1)
        per: dict[str, list[int]] = {}
        for b in loader:
            for f in ("query", "doc", "prompt"):
                if f"{f}_input_ids" not in b:
                    continue
                ids, mask = b[f"{f}_input_ids"], b[f"{f}_attention_mask"]
                acc = per.setdefault(f, [0, 0, 0])
                acc[0] += int(mask.sum())
                acc[1] += mask.numel()
                for idx in plan_chunks(mask.sum(1).numpy(), args.chunk_tokens):
                    acc[2] += chunk_view(ids, mask, idx)[1].numel()
        real = sum(v[0] for v in per.values())
        padded = sum(v[1] for v in per.values())
        chunked = sum(v[2] for v in per.values())
        fields = ", ".join(f"{f} {v[0] / v[1]:.3f} -> {v[0] / v[2]:.3f}" for f, v in per.items())
        print(f"stage {stage} (batch {lc.batch_size}, chunk_tokens {args.chunk_tokens}): real/padded tokens "
              f"{real / padded:.3f} padded batch -> {real / chunked:.3f} chunked  [{fields}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
