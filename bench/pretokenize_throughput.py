"""Pre-tokenization throughput: the full Ray job vs the raw fast tokenizer on the same texts, same run.

    python bench/pretokenize_throughput.py [--records 100000] [--workers 1 2] [--tokenizer PATH]

Builds contrastive records from SciFact (title -> abstract, next abstract as negative), replicated to --records,
then measures (a) the raw fast tokenizer (the Rust `tokenizers` object, `encode_batch_fast`, truncating) batch-encoding
exactly the texts the job encodes, in one process pinned to one thread (RAYON_NUM_THREADS=1), and (b) the whole job
(plan, read, validate, tokenize, hash,
write tars and manifest) with N tokenizer actors. Prints tokens/s and the ratio per core used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RAW = r"""
import json, os, sys, time
from common.pretrained import load_tokenizer
from data_pipeline.text import TokenizationConfig, TextEncoder
from data_pipeline.instructions import InstructionTable
src, spec, qmax, dmax = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(l) for l in open(src)]
ins = InstructionTable.load().lookup("scifact", False).query_for("")
queries = [f"Instruct: {ins}\nQuery:{r['query']}" for r in rows]
docs = [d for r in rows for d in [r["pos"], *r["neg"]]]
tok = load_tokenizer(spec).backend_tokenizer  # the fastest raw path: Rust, no offsets, truncating
t = time.perf_counter()
n = 0
for texts, cap in ((queries, qmax), (docs, dmax)):
    tok.enable_truncation(cap)
    for i in range(0, len(texts), 1000):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i+1000], add_special_tokens=False))
dt = time.perf_counter() - t
print(json.dumps({"tokens": n, "seconds": dt}))
"""


def make_records(scifact: Path, out: Path, n: int) -> None:
    docs = [json.loads(line) for line in open(scifact / "corpus.jsonl")]
    with open(out, "w") as f:
        for i in range(n):
            d, nxt = docs[i % len(docs)], docs[(i + 1) % len(docs)]
            f.write(
                json.dumps({"query": d["title"], "pos": d["text"], "neg": [nxt["text"]], "source": "scifact"}) + "\n"
            )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--tokenizer", default=None, help="default: the Qwen3 tokenizer in the shared data")
    ap.add_argument("--samples-per-shard", type=int, default=2000)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "scifact" / "corpus.jsonl").is_file():
        print(f"SciFact not found under {data}; set E2RANK_SHARED_DATA", file=sys.stderr)
        return 2
    spec = args.tokenizer or str(data / "tokenizers" / "qwen3")
    qmax, dmax = 64, 512
    work = Path(tempfile.mkdtemp(prefix="bench-pretok-"))
    src = work / "records.jsonl"
    make_records(data / "scifact", src, args.records)
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    raw = json.loads(
        subprocess.run(
            [sys.executable, "-c", RAW, str(src), spec, str(qmax), str(dmax)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    raw_tps = raw["tokens"] / raw["seconds"]
    print(f"records: {args.records} ({src.stat().st_size / 1e6:.0f} MB), tokenizer: {spec}")
    print(
        f"raw fast tokenizer, 1 process, 1 thread: {raw['tokens']} tokens in {raw['seconds']:.1f}s "
        f"= {raw_tps:,.0f} tokens/s"
    )
    for w in args.workers:
        out = work / f"shards-w{w}"
        cmd = [
            sys.executable,
            "-m",
            "data_pipeline",
            f"inputs=[{src}]",
            f"output={out}",
            f"num_workers={w}",
            f"samples_per_shard={args.samples_per_shard}",
            "progress=false",
            f"tokenization.tokenizer={spec}",
            f"tokenization.query_max_len={qmax + 1}",
            f"tokenization.doc_max_len={dmax + 1}",
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ}, capture_output=True)
        dt = time.perf_counter() - t
        m = json.loads((out / "manifest.json").read_text())
        tokens = m["totals"]["tokens"] - m["totals"]["samples"] * 3  # minus the appended EOS ids (not in raw)
        tps = tokens / dt
        print(
            f"ray job, {w} actor(s): {tokens} tokens in {dt:.1f}s end to end (incl. Ray start, planning, tars) "
            f"= {tps:,.0f} tokens/s; per actor {tps / w:,.0f} = {tps / w / raw_tps:.2f}x raw per core"
        )
    print(f"cores on this machine: {os.cpu_count()}; scratch: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
