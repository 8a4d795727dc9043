"""The per-source instruction table: the bundled one (official bugs fixed, official source keys accepted) and the
validation of a user's table."""

from __future__ import annotations

import pytest

from data_pipeline.instructions import InstructionError, InstructionTable

# Every `source` key of the official E2Rank stage-2 code (src/data.py), exactly as written there.
OFFICIAL_STAGE2_SOURCES = ["msmarco", "nq", "hotpotqa", "trivia", "t2ranking", "dureader", "mmarco_chinese",
                           "cMedQAv2", "miracl", "colliee", "law_gpt"]


def test_bundled_instruction_table_fixes_official_bugs():
    t = InstructionTable.load()
    nq = t.lookup("nq", allow_unknown=False)
    assert nq.query == ("Given a question, retrieve Wikipedia passages that answer the question",)
    assert len(nq.rerank) > 20  # the official tuple bug made these "G" and "i"
    for name, ins in t.sources.items():
        assert "retrieval the" not in " ".join(ins.query) and "r etrieval" not in ins.rerank, name
    assert t.lookup(None, allow_unknown=False) == t.default
    assert t.lookup("no-such-source", allow_unknown=False) is None
    assert t.lookup("no-such-source", allow_unknown=True) == t.default
    nli = t.lookup("nli", allow_unknown=False)
    assert {nli.query_for(f"premise {i}") for i in range(20)} == set(nli.query)  # alternates per record


@pytest.mark.parametrize(
    "text, message",
    [
        ("default: {query: q}\n", "default.rerank must be a non-empty string"),
        ("default: {query: q, rerank: r}\nsources: {nq: {query: '', rerank: r}}\n", "sources.nq.query"),
        ("default: {query: q, rerank: r, extra: 1}\n", "unknown key"),
        ("sources: {}\n", "must have 'default'"),
        ("default: {query: q, rerank: r}\nsources: {a: {query: q, rerank: r}}\naliases: {b: c}\n", "points to 'c'"),
        (
            "default: {query: q, rerank: r}\nsources: {a: {query: q, rerank: r}}\naliases: {a: a}\n",
            "also a source name",
        ),
        ("default: {query: q, rerank: r}\naliases: [a]\n", "'aliases' must be a mapping"),
    ],
)
def test_bad_instruction_tables(tmp_path, text, message):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(InstructionError, match=message):
        InstructionTable.load(p)


def test_every_official_stage2_source_key_is_accepted_as_written():
    t = InstructionTable.load()
    for key in OFFICIAL_STAGE2_SOURCES:
        ins = t.lookup(key, allow_unknown=False)
        assert ins is not None and ins != t.default, key
    assert t.lookup("trivia", False) == t.lookup("triviaqa", False)
    assert t.lookup("cMedQAv2", False) == t.lookup("cmedqav2", False)
    assert t.lookup("mmarco_chinese", False) == t.lookup("mmarco_zh", False)
    assert t.lookup("CMEDQAV2", False) is None  # keys are exact, as in the official code
