"""experiments/paired_report.py: paired tests from evaluate()'s run files, and per-query scores kept beside them."""

import json

from evaluation.metrics import run_file
from evaluation.readers import write_trec_run
from experiments.paired_report import report

QRELS = {f"q{i}": {f"d{i}": 1} for i in range(8)}


def _runs(tmp_path):
    # "good" ranks each query's relevant document first, "bad" second or third, "first_stage" anywhere.
    for mode, rank in (("good", lambda i: 0), ("bad", lambda i: 1 + i % 2), ("first_stage", lambda i: i % 3)):
        run = {}
        for i, (q, rel) in enumerate(QRELS.items()):
            docs = ["x1", "x2"]
            docs.insert(rank(i), next(iter(rel)))
            run[q] = {d: float(3 - j) for j, d in enumerate(docs)}
        write_trec_run(run_file(tmp_path, "toy", "m", mode), run, "m")


def test_report_writes_paired_tests_and_per_query_scores(tmp_path, capsys):
    _runs(tmp_path)
    out = tmp_path / "out"
    res = report({"toy": (QRELS, tmp_path)}, [("toy", ("m", "good"), ("m", "bad")),
                                              ("toy", ("m", "good"), ("m", "first_stage")),
                                              ("toy", ("m", "listwise"), ("m", "good"))], out)
    assert set(res) == {"toy: m good vs m bad", "toy: m good vs BM25"}
    r = res["toy: m good vs m bad"]
    assert r["queries"] == 8 and r["mean_b"] == 1.0 and r["diff"] == 1.0 - r["mean_a"] > 0.4
    assert "toy: m listwise vs m good: not scored" in capsys.readouterr().out
    assert json.loads((out / "paired.json").read_text()) == res
    pq = json.loads((out / "per_query.json").read_text())
    assert set(pq) == {"toy.m.good", "toy.m.bad", "toy.m.first_stage"} and pq["toy.m.good"] == {q: 1.0 for q in QRELS}
    assert not list(out.glob(".*.tmp"))


def test_report_with_a_seed_keys_per_query_scores_by_seed_and_keeps_other_seeds(tmp_path):
    _runs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "per_query.json").write_text(json.dumps({"seed0": {"toy.m.good": {"q0": 0.5}}}))
    report({"toy": (QRELS, tmp_path)}, [("toy", ("m", "good"), ("m", "bad"))], out, seed=1)
    pq = json.loads((out / "per_query.json").read_text())
    assert set(pq) == {"seed0", "seed1"} and pq["seed0"] == {"toy.m.good": {"q0": 0.5}}
    assert pq["seed1"]["toy.m.good"] == {q: 1.0 for q in QRELS}
