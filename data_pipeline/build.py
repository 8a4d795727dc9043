"""Build one shard from its slice of the input: read -> validate -> tokenize -> write tar, quarantine and stats.

Runs inside a Ray actor (one tokenizer per actor) but is plain Python, so it is tested without Ray too.
A shard is done when its stats file exists: the tar and quarantine part are renamed into place before it.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import formats
from .config import PipelineConfig
from .formats import BadRecord
from .instructions import InstructionTable
from .shards import atomic_write_bytes, encode_sample, write_shard
from .text import TextEncoder, content_hash

PARTS = ".parts"
DEFAULT_SOURCE = "default"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def stats_path(out_dir: Path, i: int) -> Path:
    return out_dir / PARTS / f"shard-{i:06d}.stats.json"


def quarantine_path(out_dir: Path, i: int) -> Path:
    return out_dir / PARTS / f"shard-{i:06d}.quarantine.jsonl"


def read_segment(seg: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bytes | dict]]:
    """Yield (origin, raw) for each record of a planned input segment; raw is line bytes or a parquet row."""
    path = seg["file"]
    if seg["format"] == "jsonl":
        with open(path, "rb") as f:
            f.seek(seg["offset"])
            for k in range(seg["count"]):
                line = f.readline()
                yield {"file": path, "line": seg["first_line"] + k}, line.rstrip(b"\r\n")
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        start, end, base = seg["row"], seg["row"] + seg["count"], 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if base + n > start and base < end:
                rows = pf.read_row_group(rg).to_pylist()
                for j in range(max(start, base), min(end, base + n)):
                    yield {"file": path, "row": j + 1}, rows[j - base]
            base += n


def _quarantine_entry(origin: dict, raw: bytes | dict, err: BadRecord) -> dict[str, Any]:
    entry = {**origin, "reason": err.reason, "detail": err.detail}
    if isinstance(raw, bytes):
        try:
            entry["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry["raw_base64"] = base64.b64encode(raw).decode()
    else:
        entry["raw"] = raw
    return entry


class ShardBuilder:
    def __init__(self, cfg: PipelineConfig, encoder: TextEncoder | None = None, table: InstructionTable | None = None):
        self.cfg = cfg
        self.enc = encoder or TextEncoder.from_config(cfg.tokenization)
        self.table = table or InstructionTable.load(cfg.instructions)
        self.config_hash = cfg.content_hash()

    def is_done(self, out_dir: Path, plan: dict) -> dict | None:
        sp = stats_path(out_dir, plan["shard"])
        if not sp.is_file() or not (out_dir / shard_name(plan["shard"])).is_file():
            return None
        stats = json.loads(sp.read_text())
        if (out_dir / shard_name(plan["shard"])).stat().st_size != stats.get("bytes"):  # truncated since: rebuild
            return None
        return stats if stats.get("config_hash") == self.config_hash and stats.get("plan") == plan else None

    # -- parse + validate ------------------------------------------------------------------------------------
    def _parse(self, raw: bytes | dict):
        obj = formats.decode_line(raw, self.cfg.max_record_bytes) if isinstance(raw, bytes) else raw
        if isinstance(raw, dict):  # a Parquet row
            try:
                n = len(json.dumps(raw, default=str))
            except (RecursionError, ValueError) as e:
                raise BadRecord("invalid_row", f"row cannot be represented as JSON: {type(e).__name__}") from None
            if n > self.cfg.max_record_bytes:
                raise BadRecord("oversize", f"record exceeds max_record_bytes={self.cfg.max_record_bytes}")
        if self.cfg.kind == "contrastive":
            rec = formats.parse_contrastive(obj)
            if len(rec.negatives) < self.cfg.min_negatives:
                raise BadRecord(
                    "too_few_negatives", f"{len(rec.negatives)} negatives < min_negatives={self.cfg.min_negatives}"
                )
        else:
            rec = formats.parse_listwise(obj)
        instr = self.table.lookup(rec.source, self.cfg.allow_unknown_sources)
        if instr is None:
            raise BadRecord(
                "unknown_source",
                f"source {rec.source!r} is not in the instruction table; add it there or set allow_unknown_sources",
            )
        return rec, instr

    def build(self, plan: dict, out_dir: Path) -> dict[str, Any]:
        shard = plan["shard"]
        good, quarantine, blank = [], [], 0
        index = plan["first_index"]
        for seg in plan["segments"]:
            for origin, raw in read_segment(seg):
                if isinstance(raw, bytes) and not raw.strip():
                    blank += 1
                    index += 1
                    continue
                try:
                    rec, instr = self._parse(raw)
                    good.append((index, origin, rec, instr))
                except BadRecord as e:
                    quarantine.append(_quarantine_entry(origin, raw, e))
                index += 1
        samples, lengths, truncated = self._tokenize(good, quarantine)
        samples.sort(key=lambda s: (s[1]["source"], s[0]))  # group by source: shards carry compact source runs
        members, runs = [], []
        for key, meta, arrays in samples:
            members += encode_sample(key, self.cfg.kind, arrays, meta)
            if runs and runs[-1][0] == meta["source"]:
                runs[-1][1] += 1
            else:
                runs.append([meta["source"], 1])
        name = shard_name(shard)
        nbytes, sha = write_shard(out_dir / name, members)
        quarantine.sort(key=lambda q: (q["file"], q.get("line", q.get("row", 0))))
        atomic_write_bytes(
            quarantine_path(out_dir, shard), "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine).encode()
        )
        stats = {
            "shard": shard,
            "plan": plan,
            "config_hash": self.config_hash,
            "name": name,
            "samples": len(samples),
            "source_runs": runs,
            "bytes": nbytes,
            "sha256": sha,
            "records": index - plan["first_index"] - blank,
            "blank_lines": blank,
            "bad": dict(Counter(q["reason"] for q in quarantine)),
            "lengths": lengths,
            "duplicate_negatives_dropped": truncated.pop("_duplicate_negatives", 0),
            "truncated": truncated,
            "max_docs": max((m["n_docs"] for _, m, _ in samples), default=0),
        }
        atomic_write_bytes(stats_path(out_dir, shard), json.dumps(stats, sort_keys=True).encode())
        return stats

    # -- tokenize ----------------------------------------------------------------------------------------------
    def _tokenize(self, good, quarantine):
        cfg, enc = self.cfg, self.enc
        lengths: dict[str, list[int]] = {"query": [], "doc": []}
        truncated = Counter()
        if not good:
            return [], lengths, dict(truncated)
        q_text = [r.query for _, _, r, _ in good]
        q_instr = [
            (r.instruction if getattr(r, "instruction", None) else ins.query_for(r.query)) for _, _, r, ins in good
        ]
        q_ids, q_cut = enc.encode_queries_flagged(q_text, q_instr)
        if cfg.kind == "contrastive":
            docs = [list(r.positives) + list(r.negatives) for _, _, r, _ in good]
            rankings = levels = [None] * len(good)
            prompts = [None] * len(good)
        else:
            docs, rankings, levels = [], [], []
            for idx, _, r, _ in good:
                order = list(range(len(r.documents)))
                if cfg.shuffle_candidates:
                    order = list(np.random.default_rng([cfg.seed, idx]).permutation(len(order)))
                inv = {old: new for new, old in enumerate(order)}
                docs.append([r.documents[o] for o in order])
                rankings.append([inv[x] for x in r.ranking])
                levels.append(None if r.levels is None else [r.levels[o] for o in order])
            lengths["prompt"] = []
            prompts = enc.encode_listwise_each(q_text, docs, [ins.rerank for _, _, _, ins in good])
        flat = [d for ds in docs for d in ds]
        d_ids, d_cut = enc.encode_documents_flagged(flat)
        samples, pos = [], 0
        for (idx, origin, rec, _), qi, qc, ds, rk, lv, pr in zip(good, q_ids, q_cut, docs, rankings, levels, prompts):
            di, dc = d_ids[pos : pos + len(ds)], d_cut[pos : pos + len(ds)]
            pos += len(ds)
            if pr is not None and pr.problem is not None:
                quarantine.append(_quarantine_entry(origin, {"query": rec.query}, pr.problem))
                continue
            arrays = {
                "query_ids": qi,
                "doc_ids": np.concatenate(di),
                "doc_offsets": np.concatenate([[0], np.cumsum([len(x) for x in di])]),
                "doc_hash": np.array([content_hash(d) for d in ds], dtype=np.uint64),
            }
            meta = {"source": rec.source or DEFAULT_SOURCE, "origin": origin, "n_docs": len(ds)}
            if cfg.kind == "contrastive":
                meta["n_pos"] = len(rec.positives)
                truncated["_duplicate_negatives"] += rec.duplicate_negatives
            else:
                arrays["prompt_ids"], cut = pr.ids, pr.cut
                arrays["ranking"] = np.asarray(rk)
                if lv is not None:
                    arrays["levels"] = np.asarray(lv)
                meta["prompt_docs_cut"] = cut
                lengths["prompt"].append(len(arrays["prompt_ids"]))
                truncated["prompt_docs"] += cut
            lengths["query"].append(len(qi))
            lengths["doc"] += [len(x) for x in di]
            truncated["query"] += int(qc)
            truncated["doc"] += sum(dc)
            samples.append((f"{idx:010d}", meta, arrays))
        return samples, lengths, dict(truncated)
