"""experiments/proof_tables.py: a proof's tables rebuilt from per_query.json keyed by seed, seeds pooled per query."""

import json

import pytest

from experiments.proof_tables import load, main, paired_tests, pooled, render

QS = [f"q{i}" for i in range(20)]


def _seed(listwise: float, retrieval: float, jitter: float) -> dict:
    # listwise beats retrieval on every query by a seed-dependent margin; first stage sits below both
    return {"scifact.stage2.listwise": {q: listwise + jitter * (i % 3) for i, q in enumerate(QS)},
            "scifact.stage2.retrieval": {q: retrieval + jitter * (i % 3) for i, q in enumerate(QS)},
            "scifact.stage2.first_stage": {q: 0.3 for q in QS},
            "noveleval.base.listwise": {q: 0.4 for q in QS[:5]}}


def test_seeds_pool_per_query_so_n_stays_the_query_count():
    pq = {"seed0": _seed(0.7, 0.6, 0.01), "seed1": _seed(0.9, 0.6, 0.02)}
    scores, seeds = pooled(pq, "scifact.stage2.listwise")
    assert seeds == ["seed0", "seed1"] and len(scores) == len(QS)
    assert scores["q1"] == pytest.approx((0.71 + 0.92) / 2)
    _, stats = paired_tests(pq)
    s = next(x for x in stats if x["b"] == "stage2.listwise" and x["a"] == "stage2.retrieval")
    assert s["queries"] == len(QS) and s["seeds"] == ["seed0", "seed1"]
    assert s["diff"] == pytest.approx(0.2) and s["p_ttest"] < 1e-6


def test_missing_sides_are_listed_not_dropped_and_each_seed_gets_its_bm25_row():
    pq = {"seed0": _seed(0.7, 0.6, 0.01), "seed1": _seed(0.5, 0.6, 0.01)}
    text, stats = render(pq)
    assert "| scifact | stage2.retrieval vs stage1.retrieval | - | - | not scored |" in text
    assert {(x["b"], x["a"]) for x in stats} == {("stage2.listwise", "stage2.retrieval"),
                                                 ("stage2.listwise", "stage2.first_stage")}
    assert "| seed0 | 0.3000 -> 0.7095 |" in text and "| seed1 | 0.3000 -> 0.5095 |" in text
    assert (
        "| stage2 | 2 | 0.6095 (0.6095, 0.6095) | 0.6095 (0.7095, 0.5095) |" in text
    )  # mean of the seeds, each seed in brackets


def test_a_flat_file_is_refused_with_its_path_and_can_be_wrapped_as_one_seed(tmp_path, capsys):
    flat = _seed(0.7, 0.6, 0.01)
    (tmp_path / "per_query.json").write_text(json.dumps(flat))
    with pytest.raises(ValueError, match="per_query.json.*--seed N"):
        load(tmp_path)
    assert main([str(tmp_path), "--seed", "1"]) == 0
    assert json.loads((tmp_path / "per_query.json").read_text()) == {"seed1": flat}
    assert (tmp_path / "tables.md").read_text() in capsys.readouterr().out
    assert json.loads((tmp_path / "tests.json").read_text())[0]["seeds"] == ["seed1"]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit, match="already keyed by seed"):
        main([str(tmp_path), "--seed", "1"])
