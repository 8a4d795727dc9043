import pytest

from data_pipeline.formats import BadRecord, decode_line, parse_contrastive, parse_listwise


def reason(fn, *a):
    with pytest.raises(BadRecord) as e:
        fn(*a)
    return e.value.reason


def test_contrastive_shapes_normalise_to_one_record():
    native = parse_contrastive({"query": "q", "pos": "p", "neg": ["n1", "n2"], "source": "nq"})
    echo = parse_contrastive({"query": "q", "positive": "p", "negative": "n1"})
    flag = parse_contrastive({"query": "q", "pos": ["p"], "neg": ["n1"], "pos_scores": [1.0], "neg_scores": [0.1],
                              "prompt": "Represent this: ", "type": "normal"})
    assert native.positives == echo.positives == flag.positives == ("p",)
    assert native.negatives == ("n1", "n2") and echo.negatives == ("n1",)
    assert native.source == "nq" and echo.source is None
    assert flag.instruction == "Represent this: "


def test_contrastive_duplicate_negatives_are_dropped_not_the_record():
    r = parse_contrastive({"query": "q", "pos": "p", "neg": ["n", "m", "n"]})
    assert r.negatives == ("n", "m") and r.duplicate_negatives == 1


def test_graded_listwise_records():
    r = parse_listwise({"query": "q", "document": ["a", "b", "c", "d"], "relevance": [0, 2, 0, 1]})
    assert r.ranking == (1, 3, 0, 2) and r.levels == (2, 0, 2, 1)  # ties keep the stored order, share a level
    both = parse_listwise({"query": "q", "document": ["a", "b", "c"], "relevance": [1, 0, 1], "ranking": [3, 1, 2]})
    assert both.ranking == (2, 0, 1) and both.levels is None  # the ranking orders inside a grade: a full order


def test_listwise_ranking_becomes_zero_based():
    r = parse_listwise({"query": "q", "document": ["a", "b", "c"], "ranking": [2, 3, 1], "source": "msmarco"})
    assert r.ranking == (1, 2, 0) and r.documents == ("a", "b", "c")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"{not json", "invalid_json"),
        (b'{"query": "caf\xe9"}', "not_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b'{"query": "' + b"x" * 200 + b'"}', "oversize"),
    ],
)
def test_line_level_reasons(raw, expected):
    assert reason(decode_line, raw, 100) == expected


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"pos": "p"}, "missing_field"),
        ({"query": 3, "pos": "p"}, "wrong_type"),
        ({"query": "  ", "pos": "p"}, "empty_text"),
        ({"query": "q", "pos": []}, "empty_text"),
        ({"query": "q", "pos": "p", "neg": ["p"]}, "negative_equals_positive"),
        ({"query": "q", "pos": "p", "positive": "p"}, "wrong_type"),
        ({"query": "q", "pos": "p", "source": 5}, "wrong_type"),
    ],
)
def test_contrastive_reasons(obj, expected):
    assert reason(parse_contrastive, obj) == expected


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"query": "q", "document": ["a", "b"], "ranking": [1, 1]}, "bad_ranking"),
        ({"query": "q", "document": ["a", "b"], "ranking": [0, 1]}, "bad_ranking"),
        ({"query": "q", "document": ["a", "b"], "ranking": [1, 2, 3]}, "bad_ranking"),
        ({"query": "q", "document": ["a", "a"], "ranking": [1, 2]}, "duplicate_candidates"),
        ({"query": "q", "document": ["a", "b"]}, "missing_field"),
        ({"query": "q", "document": "a", "ranking": [1]}, "wrong_type"),
        ({"query": "q", "document": ["a", ""], "ranking": [1, 2]}, "empty_text"),
        ({"query": "q", "document": ["a", "b"], "ranking": ["1", "2"]}, "wrong_type"),
        ({"query": "q", "document": ["a", "b"], "relevance": [1, 1]}, "bad_ranking"),  # no pair to learn from
        ({"query": "q", "document": ["a", "b"], "relevance": [1]}, "bad_ranking"),
        ({"query": "q", "document": ["a", "b"], "relevance": [1, True]}, "wrong_type"),
        ({"query": "q", "document": ["a", "b"], "relevance": "1 0"}, "wrong_type"),
        ({"query": "q", "document": ["a", "b"], "relevance": [0, 1], "ranking": [1, 2]}, "bad_ranking"),
    ],
)
def test_listwise_reasons(obj, expected):
    assert reason(parse_listwise, obj) == expected
