"""Teacher slates from qrels (data_pipeline/teacher.py): grades, orders inside a grade, the Ray Data job."""

from __future__ import annotations

import json

import pytest

from data_pipeline.formats import parse_listwise
from data_pipeline.teacher import TeacherConfig, order_slate, run
from evaluation.readers import load_corpus
from tests.conftest import write_jsonl


def test_order_inside_grades():
    grades, first = [0, 2, 0, 1, 0], [0, 4, 1, 3, 2]
    assert order_slate(grades, first, None, "grades") is None
    assert order_slate(grades, first, None, "bm25") == [1, 3, 0, 2, 4]
    model = [0.1, 0.0, 0.9, 0.5, 0.3]
    assert order_slate(grades, first, model, "model") == [1, 3, 2, 4, 0]
    # fusion: doc 0 is BM25 1st and model 4th of five, doc 2 BM25 2nd and model 1st, doc 4 BM25 3rd, model 3rd
    assert order_slate(grades, first, model, "fusion") == [1, 3, 2, 0, 4]


@pytest.fixture
def beir(tmp_path):
    d = tmp_path / "mini"
    d.mkdir()
    topics = ["cells divide by mitosis", "proteins fold into shapes", "rivers carry sediment", "stars fuse hydrogen"]
    corpus = [{"_id": f"d{i}", "title": "", "text": f"{topics[i % 4]} in study {i}"} for i in range(24)]
    write_jsonl(d / "corpus.jsonl", corpus)
    write_jsonl(d / "queries.jsonl", [{"_id": f"q{t}", "text": topics[t]} for t in range(4)] +
                [{"_id": "qx", "text": "nothing relevant here"}])
    (d / "qrels").mkdir()
    rows = (
        ["query-id\tcorpus-id\tscore"] + [f"q{t}\td{t}\t2" for t in range(4)] + [f"q{t}\td{t + 4}\t1" for t in range(4)]
    )
    rows += ["qx\td0\t0"]  # judged, nothing relevant: no slate
    (d / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    return d


def test_graded_slates_are_valid_records(beir, tmp_path):
    out = tmp_path / "slates.jsonl"
    counts = run(TeacherConfig(beir=str(beir), output=str(out), slate_size=6, depth=10))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts["slates"] == len(recs) == 4
    for r in recs:
        assert len(r["document"]) == 6 and sorted(r["relevance"])[-2:] == [1, 2] and "ranking" not in r
        parsed = parse_listwise(r)
        assert r["relevance"][parsed.ranking[0]] == 2 and parsed.levels is not None
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temp name, then renamed


def test_first_stage_slates_are_the_inference_prompt(beir, tmp_path):
    """slate=first_stage: the run's top `slate_size` in the run's order (relevant documents not forced in, nothing
    shuffled), as the reranking prompt holds them; a query with no relevant document there has no slate."""
    ranked = {"q0": ["d8", "d0", "d12", "d4", "d16"], "q1": ["d9", "d13", "d17", "d1"], "q2": ["d2", "d6"]}
    lines = [f"{q} Q0 {doc} {r + 1} {10 - r} bm25" for q, docs in ranked.items() for r, doc in enumerate(docs)]
    (tmp_path / "run.trec").write_text("\n".join(lines) + "\n")
    out = tmp_path / "slates.jsonl"
    cfg = TeacherConfig(
        beir=str(beir), output=str(out), slate_size=3, run=str(tmp_path / "run.trec"), slate="first_stage"
    )
    assert run(cfg)["slates"] == 2  # q1's relevant d1 is 4th: outside a slate of 3
    recs = {r["qid"]: r for r in map(json.loads, out.read_text().splitlines())}
    text = load_corpus(beir / "corpus.jsonl")
    assert recs["q0"]["document"] == [text[d] for d in ["d8", "d0", "d12"]]
    assert recs["q0"]["relevance"] == [0, 2, 0] and recs["q2"]["relevance"] == [2, 1]
    shuffled = tmp_path / "shuffled.jsonl"
    run(TeacherConfig(**{**cfg.__dict__, "output": str(shuffled), "slate": "shuffled"}))
    assert len(shuffled.read_text().splitlines()) == 4  # the default forces the relevant documents in (q1, q3 too)


def test_fusion_teacher_runs_as_a_ray_data_job(ray_local, beir, tmp_path):
    out = tmp_path / "fusion.jsonl"
    run(TeacherConfig(beir=str(beir), output=str(out), slate_size=6, depth=10, order="fusion", batch_size=2))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["qid"] for r in recs] == ["q0", "q1", "q2", "q3"]  # input order kept
    for r in recs:
        parsed = parse_listwise(r)  # the pipeline's validation: ranking agrees with the grades
        assert parsed.levels is None and [r["relevance"][i] for i in parsed.ranking][:2] == [2, 1]
