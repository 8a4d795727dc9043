"""The demo world's files: graded slates whose top grade is the query's positive, and a held-out split."""

import json
import re

from data_pipeline import demo_corpus
from data_pipeline.formats import parse_contrastive, parse_listwise


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_slates_are_graded_and_their_best_passage_is_the_positive(tmp_path):
    sizes = demo_corpus.generate(tmp_path, species=30)
    slates = _lines(tmp_path / "listwise.jsonl")
    pairs = _lines(tmp_path / "contrastive.jsonl")
    assert len(slates) == len(pairs) == sizes["train"]
    for s, c in zip(slates, pairs):
        rec = parse_listwise(s)  # the pipeline's own validation
        assert "ranking" not in s  # the order inside a grade is arbitrary: a permutation would invent pairs
        assert sorted(s["relevance"], reverse=True)[:2] == [3, 2]  # one exact passage, then same-species ones
        assert rec.levels.count(0) == 1
        best = rec.documents[rec.ranking[0]]
        assert best == parse_contrastive(c).positives[0] and s["query"] == c["query"]
        # a same-species passage (grade 2) names the query's species; an unrelated one (grade 0) does not
        species = re.search(rf"the (\w+ (?:{'|'.join(demo_corpus.KINDS)}))", c["query"]).group(1)
        for doc, g in zip(s["document"], s["relevance"]):
            assert (species in doc) == (g >= 2), (g, doc, species)


def test_held_out_queries_are_not_trained_on(tmp_path):
    demo_corpus.generate(tmp_path, species=30)
    held = {q["text"] for q in _lines(tmp_path / "eval" / "queries.jsonl")}
    trained = {s["query"] for s in _lines(tmp_path / "listwise.jsonl")}
    assert held and not held & trained
