"""The shard format: sample layout, deterministic WebDataset tar writing, random-access reading, the manifest.

A sample is a group of tar members `<key>.<field>` (WebDataset convention): token arrays as `.npy` (never pickle),
metadata as `.json`. Tars are written with fixed headers (mtime 0, uid 0, mode 0644) and sorted members, so the
same inputs and config give byte-identical shards. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# field -> dtype, per kind; the loader and tests rely on these exact names.
FIELDS = {
    "contrastive": {
        "query_ids": np.int32,
        "doc_ids": np.int32,  # all candidate documents, concatenated
        "doc_offsets": np.int64,  # n_docs + 1 boundaries into doc_ids; positives first, then negatives
        "doc_hash": np.uint64,  # content hash per document (false-negative / duplicate masking)
    },
    "listwise": {
        "query_ids": np.int32,
        "prompt_ids": np.int32,
        "doc_ids": np.int32,
        "doc_offsets": np.int64,
        "doc_hash": np.uint64,
        "ranking": np.int16,  # 0-based candidate indices, teacher's best first
    },
}


# Fields a sample carries only when its record has them.
OPTIONAL = {
    "contrastive": {},
    "listwise": {"levels": np.int16},  # graded records: per candidate, its grade's level (0 = best); ties add no pair
}


class ShardFormatError(ValueError):
    pass


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy(arr: np.ndarray) -> bytes:
    """Exactly `np.save(arr, allow_pickle=False)`, with the header cached per (dtype, shape): it is hot."""
    key = (arr.dtype.str, arr.shape)
    head = _NPY_HEADERS.get(key)
    if head is None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        head = _NPY_HEADERS[key] = buf.getvalue()[: -arr.nbytes or None]
    return head + arr.tobytes()


def _tar_header(name: str, size: int) -> bytes:
    """A USTAR header with fixed metadata (mode 0644, uid/gid 0, mtime 0), byte-equal to what `tarfile` writes for
    such a member (tested) but without its per-member object copies, which dominated shard writing."""
    raw = name.encode()
    if len(raw) > 100:
        raise ShardFormatError(f"member name {name!r} is longer than 100 bytes")
    h = bytearray(512)
    h[0 : len(raw)] = raw
    h[100:108] = b"0000644\x00"
    h[108:116] = b"0000000\x00"
    h[116:124] = b"0000000\x00"
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def encode_sample(key: str, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    if "." in key or "/" in key:
        raise ShardFormatError(f"sample key {key!r} must not contain '.' or '/'")
    spec = {**FIELDS[kind], **{f: t for f, t in OPTIONAL[kind].items() if f in arrays}}
    if set(arrays) != set(spec):
        raise ShardFormatError(f"{kind} sample {key} needs fields {sorted(spec)}, got {sorted(arrays)}")
    out = [(f"{key}.{f}.npy", _npy(np.ascontiguousarray(arrays[f], dtype=spec[f]))) for f in sorted(spec)]
    out.append((f"{key}.meta.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()))
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:  # a full disk or a kill: never leave the partial bytes behind, even under a hidden name
        tmp.unlink(missing_ok=True)
        raise


def write_shard(path: Path, members: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """Write a tar deterministically; returns (size, sha256). Partial files only exist under a hidden temp name."""
    parts = []
    for name, payload in members:
        parts += [_tar_header(name, len(payload)), payload, b"\x00" * (-len(payload) % 512)]
    parts.append(b"\x00" * 1024)  # end-of-archive marker
    size = sum(map(len, parts))
    parts.append(b"\x00" * (-size % tarfile.RECORDSIZE))  # tarfile pads archives to whole records, as we do
    data = b"".join(parts)
    atomic_write_bytes(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def decode_sample(key: str, members: dict[str, bytes], kind: str, where: str) -> dict[str, Any]:
    """One sample from its tar members' bytes (`<field>.npy` arrays, `<field>.json` metadata), as both readers
    (random access here, streaming in trainer/stream.py) return it; `where` names the shard in errors."""
    out: dict[str, Any] = {"__key__": key}
    for name, raw in members.items():
        try:
            if name.endswith(".npy"):
                out[name[:-4]] = np.load(io.BytesIO(raw), allow_pickle=False)
            elif name.endswith(".json"):
                out[name[:-5]] = json.loads(raw)
        except (ValueError, EOFError, OSError) as e:
            raise ShardFormatError(f"{where}: sample {key} member {name} is unreadable ({e}); {REBUILD}") from e
    missing = set(FIELDS[kind]) - set(out)
    if missing:
        raise ShardFormatError(f"{where}: sample {key} lacks {sorted(missing)}")
    return out


class ShardReader:
    """Random access to the samples of one shard: indexes member offsets once, then reads only what is asked."""

    def __init__(self, path: str | Path, kind: str):
        self.path = Path(path)
        self.kind = kind
        self.index: dict[str, dict[str, tuple[int, int]]] = {}
        self.keys: list[str] = []
        try:
            with tarfile.open(self.path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, field = m.name.partition(".")
                    if key not in self.index:
                        self.index[key] = {}
                        self.keys.append(key)
                    self.index[key][field] = (m.offset_data, m.size)
            size = self.path.stat().st_size
            if any(off + n > size for f in self.index.values() for off, n in f.values()):
                raise EOFError(f"members run past the end of the file ({size} bytes): truncated")
            with open(self.path, "rb") as fh:  # a tar ends with two zero blocks; a cut at a block boundary has none
                fh.seek(max(size - 1024, 0))
                if size < 1024 or fh.read(1024).strip(b"\x00"):
                    raise EOFError(f"no end-of-archive marker in its last 1024 bytes ({size} bytes): truncated")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardFormatError(f"{self.path}: not a readable shard ({type(e).__name__}: {e}); {REBUILD}") from e
        self._fh = open(self.path, "rb")

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> dict[str, Any]:
        key = self.keys[i]
        raw = {}
        for name, (off, size) in self.index[key].items():
            self._fh.seek(off)
            raw[name] = self._fh.read(size)
            if len(raw[name]) != size:
                raise ShardFormatError(f"{self.path}: sample {key} member {name} is unreadable "
                                       f"({len(raw[name])} of {size} bytes); {REBUILD}")
        return decode_sample(key, raw, self.kind, str(self.path))

    def close(self) -> None:
        self._fh.close()


def docs_of(sample: dict[str, Any]) -> list[np.ndarray]:
    off = sample["doc_offsets"]
    return [sample["doc_ids"][off[i] : off[i + 1]] for i in range(len(off) - 1)]


# -- manifest --------------------------------------------------------------------------------------------------
REBUILD = "check the folder with `python -m data_pipeline verify DIR`; re-running the pipeline rebuilds damaged shards"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def shard_problem(shard_dir: Path, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """Why a shard does not match its manifest entry (missing, size, sha256), or None when it does."""
    p = Path(shard_dir) / entry["name"]
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, the manifest says {entry['bytes']} (truncated or partly copied)"
    if checksum and (h := sha256_file(p)) != entry["sha256"]:
        return f"sha256 {h[:12]}..., the manifest says {entry['sha256'][:12]}... (bytes changed)"
    return None


def verify(shard_dir: str | Path, checksum: bool = True) -> dict[str, str]:
    """{shard name: problem} for every shard of a folder that does not match its manifest (empty when all do)."""
    d = Path(shard_dir)
    m = json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).is_file() else None
    if m is None:
        raise ShardFormatError(f"{d} has no {MANIFEST}: the pipeline did not finish there; re-run it")
    return {e["name"]: why for e in m["shards"] if (why := shard_problem(d, e, checksum))}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(
    shard_dir: str | Path, *, kind: str | None = None, tokenizer_fingerprint: str | None = None,
    local_shards: bool = True,
) -> dict[str, Any]:
    """Load and check a manifest; each failure says what to change. local_shards=False: the shards are streamed
    from elsewhere (loader.stream_url) and the folder holds only manifest.json."""
    d = Path(shard_dir)
    p = d / MANIFEST
    if not d.is_dir():
        raise ShardFormatError(f"shard directory {d} does not exist")
    if not p.is_file():
        raise ShardFormatError(
            f"{d} has no {MANIFEST}: the pipeline did not finish there; re-run `python -m data_pipeline` on it"
        )
    m = json.loads(p.read_text())
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{p}: schema_version {m.get('schema_version')} != {SCHEMA_VERSION}; re-run the pipeline"
        )
    if kind is not None and m.get("kind") != kind:
        raise ShardFormatError(f"{p}: holds {m.get('kind')!r} shards, {kind!r} expected")
    if tokenizer_fingerprint is not None and m.get("tokenizer", {}).get("fingerprint") != tokenizer_fingerprint:
        raise ShardFormatError(
            f"{p}: shards were tokenized with another tokenizer ({m.get('tokenizer', {}).get('name')}); "
            "re-run the pipeline with this model's tokenizer"
        )
    for s in m["shards"] if local_shards else ():  # existence, size; the loader checks sha256 on first open
        if why := shard_problem(d, s, checksum=False):
            raise ShardFormatError(f"{d / s['name']}: {why}; {REBUILD}")
    return m
