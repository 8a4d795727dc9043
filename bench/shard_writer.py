"""Our shard writer (data_pipeline/shards.py write_shard) against webdataset's TarWriter on the same samples:
bytes (are the shards identical? is each writer deterministic?) and speed, measured in the same run.

    python bench/shard_writer.py [--samples 4000] [--per-shard 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def samples(n: int, seed: int = 0):
    """Stage-1-shaped samples: a query and 8 documents of realistic token lengths, as the pipeline encodes them."""
    from data_pipeline.shards import encode_sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = rng.integers(0, 150_000, rng.integers(8, 48)).astype(np.int32)
        docs = [rng.integers(0, 150_000, rng.integers(40, 400)).astype(np.int32) for _ in range(8)]
        arrays = {"query_ids": q, "doc_ids": np.concatenate(docs),
                  "doc_offsets": np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64),
                  "doc_hash": rng.integers(0, 2**63, 8).astype(np.uint64)}
        out.append(encode_sample(str(i), "contrastive", arrays, {"source": "msmarco", "origin": f"x:{i}", "n_docs": 8,
                                                                  "n_pos": 1}))
    return out


def ours(members, path: Path) -> bytes:
    from data_pipeline.shards import write_shard

    write_shard(path, [m for s in members for m in s])
    return path.read_bytes()


def webdataset(members, path: Path) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for s in members:
            key = s[0][0].split(".", 1)[0]
            w.write({"__key__": key, **{name.split(".", 1)[1]: data for name, data in s}})
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    data = samples(args.samples)
    shards = [data[i:i + args.per_shard] for i in range(0, len(data), args.per_shard)]
    mb = sum(len(b) for s in data for _, b in s) / 2**20
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("ours", ours), ("webdataset", webdataset)):
            times, digests = [], []
            for rep in range(3):
                t = time.perf_counter()
                out = [fn(s, Path(tmp) / f"{name}-{rep}-{k}.tar") for k, s in enumerate(shards)]
                times.append(time.perf_counter() - t)
                digests.append([hashlib.sha256(b).hexdigest() for b in out])
                time.sleep(1.1)  # a writer that stamps the clock into its headers shows it across repetitions
            res[name] = {"s": sorted(times)[1], "deterministic": all(d == digests[0] for d in digests),
                         "digests": digests[0], "bytes": sum(len(b) for b in out)}
    same = res["ours"]["digests"] == res["webdataset"]["digests"]
    print(f"{args.samples} samples ({mb:.1f} MiB of payload) in {len(shards)} shards, median of 3:")
    for name, r in res.items():
        print(f"  {name:10s} {r['s']:.3f} s  {mb / r['s']:.0f} MiB/s  {r['bytes']} bytes  "
              f"deterministic across runs: {r['deterministic']}")
    print(f"webdataset TarWriter / ours, time: {res['webdataset']['s'] / res['ours']['s']:.2f}x; "
          f"byte-identical shards: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
