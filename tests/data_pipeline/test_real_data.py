"""Real data nobody here wrote (../shared/data): SciFact with BM25 negatives, FlagEmbedding examples as slates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.pretrained import load_tokenizer
from data_pipeline.beir import bm25_contrastive
from data_pipeline.config import PipelineConfig
from data_pipeline.convert import flagembedding_to_listwise
from data_pipeline.job import run
from data_pipeline.shards import ShardReader, docs_of
from data_pipeline.text import TokenizationConfig
from trainer.loader import LoaderConfig, ShardLoader

pytestmark = pytest.mark.slow


def test_scifact_train_with_bm25_negatives(ray_local, shared_data, qwen3_tokenizer_path, tmp_path):
    src = tmp_path / "scifact_train.jsonl"
    n = bm25_contrastive(shared_data / "scifact", "train", src, negatives=7, source="scifact")
    assert n == 809
    rows = [json.loads(line) for line in open(src)]
    assert all(len(r["neg"]) == 7 and not set(r["neg"]) & set(r["pos"]) for r in rows)
    tok = TokenizationConfig(tokenizer=qwen3_tokenizer_path, query_max_len=64, doc_max_len=256)
    out = tmp_path / "shards"
    m = run(PipelineConfig(kind="contrastive", inputs=[str(src)], output=str(out), samples_per_shard=200,
                           tokenization=tok, min_negatives=7, progress=False))
    assert m["totals"]["samples"] == 809 and m["totals"]["bad"] == 0 and m["per_source"] == {"scifact": 809}
    assert m["truncated"]["doc"] > 0 and m["lengths"]["doc"]["max"] == 256  # long abstracts are cut, EOS kept
    loader = ShardLoader(out, LoaderConfig(batch_size=8, negatives_per_query=7), rank=0, world_size=1)
    b = next(iter(loader))
    eos = load_tokenizer(qwen3_tokenizer_path).convert_tokens_to_ids("<|endoftext|>")
    assert (b["doc_input_ids"][:, -1] == eos).all() and (b["query_input_ids"][:, -1] == eos).all()
    assert b["doc_input_ids"].shape[0] == 8 * 8


def test_flagembedding_examples_as_listwise_and_contrastive(ray_local, shared_data, qwen3_tokenizer_path, tmp_path):
    fe = shared_data / "flagembedding_examples"
    lw = tmp_path / "lw.jsonl"
    with open(lw, "w") as f:
        for name in ("embedder_retrieval_msmarco", "embedder_retrieval_nq"):
            src = tmp_path / f"{name}.jsonl"
            k = flagembedding_to_listwise(fe / f"{name}.jsonl", src, slate=16, source=name.split("_")[-1])
            assert k == 10
            f.write(src.read_text())
    tok = TokenizationConfig(tokenizer=qwen3_tokenizer_path, query_max_len=64, doc_max_len=128, prompt_max_len=2048,
                             prompt_doc_max_len=100)
    out = tmp_path / "lw_shards"
    m = run(PipelineConfig(kind="listwise", inputs=[str(lw)], output=str(out), samples_per_shard=8, tokenization=tok,
                           progress=False))
    assert m["totals"]["samples"] == 20 and m["per_source"] == {"msmarco": 10, "nq": 10} and m["max_slate"] == 16
    assert m["lengths"]["prompt"]["max"] <= 2048
    r = ShardReader(out / m["shards"][0]["name"], "listwise")
    s = r.read(0)
    text = load_tokenizer(qwen3_tokenizer_path).decode(s["prompt_ids"])
    assert text.startswith("<|im_start|>user\nGiven a ") and text.endswith("<think>\n\n</think>\n\n")
    assert "\nQuery: " in text and len(docs_of(s)) == 16
    # the same FlagEmbedding files read directly as stage-1 data (their "prompt" becomes the query instruction)
    out2 = tmp_path / "c_shards"
    m2 = run(PipelineConfig(kind="contrastive", inputs=[str(p) for p in sorted(Path(fe).glob("embedder_*.jsonl"))],
                            output=str(out2), tokenization=tok, progress=False, allow_unknown_sources=True))
    assert m2["totals"]["samples"] == 30 and m2["totals"]["bad"] == 0
    assert m2["totals"]["duplicate_negatives_dropped"] == 2  # NQ example 1 repeats two mined negatives
