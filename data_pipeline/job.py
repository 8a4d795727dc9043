"""The pre-tokenization job: plan shards from the inputs, build them in Ray actors, aggregate a manifest.

`python -m data_pipeline ...` runs it on an embedded local Ray; under `ray job submit` it joins that cluster.
Planning is by input position (shard k = input records [k*S, (k+1)*S)), so the shards, their contents and their
bytes do not depend on worker count or timing, and a re-run only builds the shards whose stats are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from common.ray_auth import ensure_local_token
from common.ray_head import ray_temp_dir
from common.typed_config import to_dict

from .build import PARTS, ShardBuilder, quarantine_path
from .config import PipelineConfig
from .instructions import InstructionTable
from .shards import MANIFEST, SCHEMA_VERSION, atomic_write_bytes, verify, write_manifest
from .text import TextEncoder

log = logging.getLogger(__name__)

INPUT_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}


class PipelineError(RuntimeError):
    """The job cannot run or must not publish a manifest; the message says which file and why."""


def discover_inputs(paths: list[str]) -> list[tuple[Path, str]]:
    if not paths:
        raise PipelineError("no inputs given: set `inputs` to JSONL/Parquet files or folders")
    files: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise PipelineError(f"input path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in INPUT_SUFFIXES and f.is_file())
            if not found:
                raise PipelineError(f"input folder {p} holds no .jsonl or .parquet files")
            files += [(f, INPUT_SUFFIXES[f.suffix]) for f in found]
        elif p.suffix in INPUT_SUFFIXES:
            files.append((p, INPUT_SUFFIXES[p.suffix]))
        else:
            raise PipelineError(f"input file {p} is neither .jsonl nor .parquet")
    for f, _ in files:
        if not os.access(f, os.R_OK) or not f.is_file():
            raise PipelineError(f"input file {f} is not readable")
    return files


def plan_shards(files: list[tuple[Path, str]], per_shard: int) -> tuple[list[dict], list[dict]]:
    """Split the inputs, in order, into shards of `per_shard` records; also fingerprint every input file."""
    plans: list[dict] = []
    segs: list[dict] = []
    fill, first_index, total = 0, 0, 0
    inputs = []

    def flush():
        nonlocal segs, fill, first_index
        if segs:
            plans.append({"shard": len(plans), "first_index": first_index, "segments": segs})
            first_index += fill
        segs, fill = [], 0

    for path, fmt in files:
        h = hashlib.sha256()
        try:
            if fmt == "jsonl":
                with open(path, "rb") as f:
                    offset, line_no, seg = 0, 0, None
                    for line in f:
                        h.update(line)
                        line_no += 1
                        if seg is None:
                            seg = {
                                "file": str(path),
                                "format": "jsonl",
                                "offset": offset,
                                "first_line": line_no,
                                "count": 0,
                            }
                        seg["count"] += 1
                        fill += 1
                        offset += len(line)
                        if fill == per_shard:
                            segs.append(seg)
                            seg = None
                            flush()
                    if seg is not None:
                        segs.append(seg)
                    n = line_no
            else:
                import pyarrow.parquet as pq

                h.update(path.read_bytes())
                n = pq.ParquetFile(path).metadata.num_rows
                start = 0
                while start < n:
                    take = min(per_shard - fill, n - start)
                    segs.append({"file": str(path), "format": "parquet", "row": start, "count": take})
                    fill += take
                    start += take
                    if fill == per_shard:
                        flush()
        except OSError as e:
            raise PipelineError(f"input file {path} is not readable: {e}") from e
        except Exception as e:  # pyarrow raises its own types for corrupt files
            raise PipelineError(f"input file {path} cannot be read as {fmt}: {e}") from e
        inputs.append({"path": str(path), "records": n, "sha256": h.hexdigest()})
        total += n
    flush()
    if total == 0:
        raise PipelineError(f"empty corpus: the inputs {[str(f) for f, _ in files]} hold no records")
    return plans, inputs


def _stat(xs: list[int]) -> dict[str, Any]:
    if not xs:
        return {"count": 0}
    a = np.asarray(xs)
    return {
        "count": int(a.size),
        "sum": int(a.sum()),
        "min": int(a.min()),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 2),
        "p50": int(np.percentile(a, 50)),
        "p95": int(np.percentile(a, 95)),
    }


class _RayShardActor:
    """Ray Data callable class: one tokenizer per actor, then one shard per call."""

    def __init__(self, cfg_dict: dict, out_dir: str):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per actor, as Ray accounts it
        from common.typed_config import from_dict

        self.builder = ShardBuilder(from_dict(PipelineConfig, cfg_dict))
        self.out = Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        out = []
        for plan_json in batch["plan"]:
            stats = self.builder.build(json.loads(plan_json), self.out)
            out.append(json.dumps({k: stats[k] for k in ("shard", "samples", "records", "bad")}))
        return {"stats": out}


def ray_init(cfg: PipelineConfig):
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        temp = ray_temp_dir()
        ensure_local_token()  # token auth for the embedded instance too, with a token of its own
        ray.init(
            address="local",  # a fresh embedded instance, even if a cluster runs on this machine
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            num_cpus=max(cfg.num_workers, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=300 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    return True


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the job to completion (or raise PipelineError); returns the manifest."""
    t0 = time.time()
    if not cfg.output:
        raise PipelineError("no output folder given: set `output`")
    out = Path(cfg.output)
    files = discover_inputs(cfg.inputs)
    table = InstructionTable.load(cfg.instructions)  # fail on a bad table before any work
    encoder = TextEncoder.from_config(cfg.tokenization)
    plans, inputs = plan_shards(files, cfg.samples_per_shard)
    config_hash = cfg.content_hash()
    existing = out / MANIFEST
    if existing.is_file():
        m = json.loads(existing.read_text())
        same = m.get("config_hash") == config_hash and m.get("inputs") == inputs
        damaged = verify(out) if same else {}
        if same and not damaged:
            log.info(
                f"[pipeline] {out} is complete for this config and input ({m['totals']['samples']} samples); "
                "nothing to do"
            )
            return m
        if damaged:  # rebuild exactly those (the build is deterministic: the same bytes come back)
            log.info(
                f"[pipeline] {len(damaged)} damaged shard(s), rebuilding them: "
                + "; ".join(f"{n}: {why}" for n, why in damaged.items())
            )
            for name in damaged:
                (out / name).unlink(missing_ok=True)
        elif not cfg.overwrite:
            raise PipelineError(
                f"{out} holds shards of another config or input (config {m.get('config_hash', '?')[:12]}); "
                "use a new output folder or set overwrite=true"
            )
        existing.unlink()
    if cfg.overwrite:
        shutil.rmtree(out / PARTS, ignore_errors=True)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".*.tmp*"), *(out / PARTS).glob(".*.tmp*")]:  # left by an interrupted run
        stale.unlink()

    builder = ShardBuilder(cfg, encoder, table)
    done = {p["shard"]: s for p in plans if (s := builder.is_done(out, p)) is not None}
    todo = [p for p in plans if p["shard"] not in done]
    log.info(
        f"[pipeline] {cfg.kind}: {sum(i['records'] for i in inputs)} records in {len(files)} file(s) -> "
        f"{len(plans)} shard(s) of <= {cfg.samples_per_shard}; {len(done)} already built, {len(todo)} to build "
        f"with {cfg.num_workers} tokenizer actor(s); tokenizer {cfg.tokenization.tokenizer}"
    )
    if todo:
        _build_with_ray(cfg, todo, out)
    stats = [builder.is_done(out, p) for p in plans]
    missing = [p["shard"] for p, s in zip(plans, stats) if s is None]
    if missing:
        raise PipelineError(f"shards {missing[:10]} were not built; re-run the job to finish them")

    bad = Counter()
    for s in stats:
        bad.update(s["bad"])
    records = sum(s["records"] for s in stats)
    n_bad = sum(bad.values())
    q_all = b"".join(quarantine_path(out, s["shard"]).read_bytes() for s in stats)
    atomic_write_bytes(out / "quarantine.jsonl", q_all)
    samples = sum(s["samples"] for s in stats)
    per_source = Counter()
    for s in stats:
        for src, n in s["source_runs"]:
            per_source[src] += n
    lengths = {k: _stat([x for s in stats for x in s["lengths"].get(k, [])]) for k in stats[0]["lengths"]}
    truncated = Counter()
    for s in stats:
        truncated.update(s["truncated"])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": cfg.kind,
        "config_hash": config_hash,
        "config": {k: v for k, v in to_dict(cfg).items() if k not in ("output", "progress", "overwrite")},
        "tokenizer": {
            "name": cfg.tokenization.tokenizer,
            "fingerprint": encoder.fingerprint(),
            "pad_id": int(encoder.pad_id),
            "eos_id": None if encoder.eos_id is None else int(encoder.eos_id),
            "chat_template": encoder.chat_prefix is not None,
        },
        "inputs": inputs,
        "shards": [{k: s[k] for k in ("name", "samples", "source_runs", "bytes", "sha256")} for s in stats],
        "totals": {
            "records": records,
            "samples": samples,
            "bad": n_bad,
            "blank_lines": sum(s["blank_lines"] for s in stats),
            "duplicate_negatives_dropped": sum(s["duplicate_negatives_dropped"] for s in stats),
            "tokens": sum(v.get("sum", 0) for v in lengths.values()),
        },
        "per_source": dict(sorted(per_source.items())),
        "max_slate": max(s["max_docs"] for s in stats),
        "quarantine": dict(sorted(bad.items())),
        "lengths": lengths,
        "truncated": dict(sorted(truncated.items())),
    }
    frac = n_bad / max(records, 1)
    summary = _summary(manifest, out, time.time() - t0)
    if frac > cfg.max_bad_fraction:
        log.info(summary)
        raise PipelineError(
            f"{n_bad} of {records} records ({frac:.1%}) are bad, above max_bad_fraction={cfg.max_bad_fraction:.1%}: "
            f"{dict(bad)}; see {out / 'quarantine.jsonl'} (file, line and reason for each). No manifest was written."
        )
    if samples == 0:
        raise PipelineError(
            f"empty corpus: no valid record in {[str(f) for f, _ in files]}; see {out / 'quarantine.jsonl'}"
        )
    write_manifest(out, manifest)
    log.info(summary)
    return manifest


def _build_with_ray(cfg: PipelineConfig, todo: list[dict], out: Path) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    started = ray_init(cfg)
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        ds = ray.data.from_items([{"plan": json.dumps(p)} for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            _RayShardActor,
            fn_constructor_kwargs={"cfg_dict": to_dict(cfg), "out_dir": str(out.resolve())},
            batch_size=1,
            compute=ActorPoolStrategy(size=min(cfg.num_workers, len(todo))),
            num_cpus=1,
        )
        bar = _progress(len(todo), cfg.progress)
        t0, recs = time.time(), 0
        try:
            for row in ds.iter_rows():
                s = json.loads(row["stats"])
                recs += s["records"]
                bar.update(1)
                bar.set_postfix(records_per_s=f"{recs / max(time.time() - t0, 1e-6):.0f}", refresh=False)
        except Exception as e:  # an actor failed; Ray wraps the cause: name it, in one line
            if "No space left on device" in str(e) or "Errno 28" in str(e):
                raise PipelineError(
                    f"out of disk space writing shards to {out}: no manifest was written and no partial shard is "
                    "left under a final name; free space (or choose another output) and re-run: finished shards "
                    "are kept and only the rest is built"
                ) from e
            raise
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="shard", desc="[pipeline] shards", disable=not enabled, file=sys.stderr, mininterval=1.0
    )


def _summary(m: dict, out: Path, seconds: float) -> str:
    t = m["totals"]
    lines = [
        f"[pipeline] done in {seconds:.1f}s -> {out}",
        f"  shards: {len(m['shards'])}, samples: {t['samples']}, records read: {t['records']}, bad: {t['bad']}"
        f" ({t['bad'] / max(t['records'], 1):.2%}), tokens: {t['tokens']}"
        f" ({t['tokens'] / max(seconds, 1e-6):.0f} tokens/s)",
        f"  per source: {m['per_source']}",
        f"  quarantined by reason: {m['quarantine'] or 'none'}",
        "  token lengths: "
        + "; ".join(f"{k} mean {v.get('mean')} p95 {v.get('p95')} max {v.get('max')}" for k, v in m["lengths"].items()),
        f"  truncated: {m['truncated'] or 'none'}",
    ]
    return "\n".join(lines)
