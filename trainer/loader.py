"""The loader the trainer streams shards with: deterministic, rank-equal, same-source capable, exactly resumable.

The whole epoch is planned from the manifest alone (no I/O): samples are permuted from (seed, epoch), cut into
global batches of batch_size x world_size x grad_accum (optionally one source per global batch), and every rank
takes its slice of each. So all ranks yield exactly the same number of batches (unequal counts hang ZeRO-3), a
batch's position is a single integer, and resuming at position p replays exactly what an uninterrupted run sees.
Shards are read by random access (member offsets), so a rank reads only its own samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import REBUILD, ShardFormatError, ShardReader, docs_of, read_manifest, shard_problem
from modeling.embedding import left_pad


class LoaderError(ValueError):
    pass


@dataclass
class LoaderConfig:
    batch_size: int = 8  # queries per rank per micro-step
    grad_accum: int = 1  # micro-batches per optimizer step
    same_source: bool = False  # every global batch (all ranks, all accumulation steps) from one source
    negatives_per_query: int = 1  # contrastive: hard negatives drawn per query and epoch
    slate_size: int = 0  # listwise: candidates per query; 0 = the largest slate in the shards
    pad_to_multiple_of: int = 8  # padded lengths rounded up to this (tensor-core friendly shapes)
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    seed: int = 0  # the data order: samples permuted from (seed, epoch)
    verify_checksums: bool = True  # sha256 of each shard against the manifest the first time a process opens it
    # Streaming (trainer/stream.py), for clusters without a shared filesystem: each shard's URL, `{name}` the
    # manifest's shard name, e.g. "https://host/shards/{name}" or "pipe:aws s3 cp s3://bucket/shards/{name} -".
    # Then `shards` needs only manifest.json.
    stream_url: str = ""
    shuffle_buffer: int = 1000  # streaming: samples held for the seeded shuffle inside each rank's stream

    def validate(self) -> None:
        for k in ("batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"loader.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("negatives_per_query", "slate_size", "num_workers"):
            if getattr(self, k) < 0:
                raise ValueError(f"loader.{k} must be >= 0, got {getattr(self, k)}")
        if self.pad_to_multiple_of < 1:
            raise ValueError("loader.pad_to_multiple_of must be >= 1")
        if self.stream_url and "{name}" not in self.stream_url:
            raise ValueError("loader.stream_url must contain {name} (each manifest shard's file name)")
        if self.stream_url and self.same_source:
            raise ValueError("loader.same_source needs random access to the shards; it cannot stream (stream_url)")


def epoch_plan(manifest: dict, cfg: LoaderConfig, world_size: int, epoch: int) -> tuple[np.ndarray, list[str], int]:
    """Global batches for one epoch: array [n_batches, G, 2] of (shard, index), each batch's source, dropped count."""
    g = cfg.batch_size * world_size * cfg.grad_accum
    by_source: dict[str, list[tuple[int, int]]] = {}
    for si, shard in enumerate(manifest["shards"]):
        i = 0
        for src, n in shard["source_runs"]:
            key = src if cfg.same_source else "*"
            by_source.setdefault(key, []).extend((si, i + k) for k in range(n))
            i += n
    rng = np.random.default_rng([cfg.seed, epoch])
    batches, sources, dropped = [], [], 0
    for src in sorted(by_source):
        items = np.asarray(by_source[src], dtype=np.int64).reshape(-1, 2)
        items = items[rng.permutation(len(items))]
        n = len(items) // g
        dropped += len(items) - n * g
        if n:
            batches.append(items[: n * g].reshape(n, g, 2))
            sources += [src] * n
    if not batches:
        raise LoaderError(
            f"no full global batch of {g} (batch_size {cfg.batch_size} x world {world_size} x grad_accum "
            f"{cfg.grad_accum}) fits in {manifest['totals']['samples']} samples"
            + (" per source" if cfg.same_source else "")
            + "; lower the batch size or add data"
        )
    allb = np.concatenate(batches)
    order = rng.permutation(len(allb))
    return allb[order], [sources[i] for i in order], dropped


def _hash_tensor(h: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(h, dtype=np.uint64).view(np.int64))


class Collator:
    def __init__(self, kind: str, cfg: LoaderConfig, pad_id: int, slate: int, epoch: int):
        self.kind, self.cfg, self.pad_id, self.slate, self.epoch = kind, cfg, pad_id, slate, epoch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        m = self.cfg.pad_to_multiple_of
        out: dict[str, Any] = {
            "keys": [s["__key__"] for s in samples],
            "sources": [s["meta"]["source"] for s in samples],
        }
        queries = [s["query_ids"] for s in samples]
        docs, hashes, extra = [], [], {}
        if self.kind == "contrastive":
            k = self.cfg.negatives_per_query
            for s in samples:
                ds, n_pos = docs_of(s), s["meta"]["n_pos"]
                rng = np.random.default_rng([self.cfg.seed, self.epoch, int(s["__key__"])])
                p = int(rng.integers(n_pos))
                negs = list(range(n_pos, len(ds)))
                if k and not negs:
                    raise LoaderError(
                        f"sample {s['__key__']} ({s['meta']['origin']}) has no hard negatives but "
                        f"negatives_per_query={k}; "
                        "set negatives_per_query=0 or rebuild the shards with min_negatives"
                    )
                if len(negs) >= k:
                    chosen = [negs[j] for j in rng.choice(len(negs), k, replace=False)] if k else []
                else:
                    perm = [negs[j] for j in rng.permutation(len(negs))]
                    chosen = [perm[j % len(perm)] for j in range(k)]
                for j in [p] + chosen:
                    docs.append(ds[j])
                    hashes.append(s["doc_hash"][j])
            out["docs_per_query"] = 1 + k
        else:
            K = self.slate
            cand_mask = torch.zeros((len(samples), K), dtype=torch.bool)
            ranking = torch.full((len(samples), K), -1, dtype=torch.long)
            levels = torch.full((len(samples), K), K, dtype=torch.long)  # RankNet: i beats j iff level_i < level_j
            filler = np.asarray([self.pad_id], np.int32)
            for b, s in enumerate(samples):
                ds = docs_of(s)
                if len(ds) > K:
                    raise LoaderError(f"sample {s['__key__']} has {len(ds)} candidates > slate_size={K}")
                docs += ds + [filler] * (K - len(ds))
                hashes += list(s["doc_hash"]) + [0] * (K - len(ds))
                cand_mask[b, : len(ds)] = True
                ranking[b, : len(ds)] = torch.from_numpy(s["ranking"].astype(np.int64))
                if "levels" in s:  # graded: tied grades share a level
                    levels[b, : len(ds)] = torch.from_numpy(s["levels"].astype(np.int64))
                else:  # a full order: the level is the rank
                    levels[b, ranking[b, : len(ds)]] = torch.arange(len(ds))
            out["docs_per_query"] = K
            extra = {"cand_mask": cand_mask, "ranking": ranking, "levels": levels}
            out["prompt_input_ids"], out["prompt_attention_mask"] = left_pad(
                [s["prompt_ids"] for s in samples], self.pad_id, m
            )
        out["query_input_ids"], out["query_attention_mask"] = left_pad(queries, self.pad_id, m)
        out["doc_input_ids"], out["doc_attention_mask"] = left_pad(docs, self.pad_id, m)
        out["doc_hash"] = _hash_tensor(np.asarray(hashes, dtype=np.uint64))
        out.update(extra)
        real = sum(
            int(out[f"{f}_attention_mask"].sum()) for f in ("query", "doc", "prompt") if f"{f}_attention_mask" in out
        )
        padded = sum(out[f"{f}_input_ids"].numel() for f in ("query", "doc", "prompt") if f"{f}_input_ids" in out)
        out["real_tokens"], out["padded_tokens"] = real, padded
        return out


_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) this process has checked


class _RankBatches(IterableDataset):
    """Yields (position, batch) for this rank's positions start, start+1, ... split over DataLoader workers."""

    def __init__(self, loader: ShardLoader, epoch: int, start: int):
        self.shard_dir = loader.shard_dir
        self.kind = loader.kind
        self.shards = [s["name"] for s in loader.manifest["shards"]]
        self.entries = loader.manifest["shards"]
        self.cfg, self.rank, self.world = loader.cfg, loader.rank, loader.world_size
        self.plan, self.sources, _ = epoch_plan(loader.manifest, loader.cfg, loader.world_size, epoch)
        self.start = start
        self.collate = Collator(loader.kind, loader.cfg, loader.pad_id, loader.slate_size, epoch)

    def __len__(self) -> int:
        return len(self.plan) * self.cfg.grad_accum

    def check(self, shard: int) -> None:
        """The shard against its manifest entry (size always; sha256 once per process, if verify_checksums): a
        damaged shard stops training with its name, rather than a bare tar error or silently wrong tokens."""
        entry = self.entries[shard]
        path = self.shard_dir / entry["name"]
        if (str(path), entry["sha256"]) in _VERIFIED:
            return
        if why := shard_problem(self.shard_dir, entry, checksum=self.cfg.verify_checksums):
            raise ShardFormatError(
                f"{path}: {why}; {REBUILD} (or set loader.verify_checksums=false to skip the sha256)"
            )
        if self.cfg.verify_checksums:
            _VERIFIED.add((str(path), entry["sha256"]))

    def rows(self, t: int) -> np.ndarray:
        b, w, a = self.cfg.batch_size, self.world, self.cfg.grad_accum
        g, step = divmod(t, a)
        lo = step * b * w + self.rank * b
        return self.plan[g, lo : lo + b]

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        readers: dict[int, ShardReader] = {}
        try:
            for t in range(self.start + wid, len(self), nw):
                samples = []
                for shard, idx in self.rows(t):
                    r = readers.get(int(shard))
                    if r is None:
                        if len(readers) >= 64:
                            readers.pop(next(iter(readers))).close()
                        self.check(int(shard))
                        r = readers[int(shard)] = ShardReader(self.shard_dir / self.shards[shard], self.kind)
                    samples.append(r.read(int(idx)))
                batch = self.collate(samples)
                batch["position"] = t
                batch["global_source"] = self.sources[t // self.cfg.grad_accum]
                yield t, batch
        finally:
            for r in readers.values():
                r.close()


class ShardLoader:
    """Iterate to get the rest of the current epoch; `state_dict()` after any batch resumes right after it."""

    def __init__(
        self,
        shard_dir: str | Path,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        kind: str | None = None,
        tokenizer_fingerprint: str | None = None,
        manifest: dict | None = None,
    ):
        self.shard_dir = Path(shard_dir)
        # a caller that already read and checked the manifest (the trainer's preflight) hands it in
        self.manifest = (
            manifest
            if manifest is not None
            else read_manifest(
                self.shard_dir, kind=kind, tokenizer_fingerprint=tokenizer_fingerprint, local_shards=not cfg.stream_url
            )
        )
        self.kind = self.manifest["kind"]
        self.cfg = cfg
        # handed in by the caller (the trainer: its process group's rank and size), never guessed from the
        # environment, which can disagree with the group (torchtitan passes dp_rank / dp_world_size the same way)
        self.rank, self.world_size = rank, world_size
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} is outside world size {self.world_size}")
        self.pad_id = self.manifest["tokenizer"]["pad_id"]
        self.slate_size = 0
        if self.kind == "listwise":
            self.slate_size = cfg.slate_size or int(self.manifest["max_slate"])
        self.epoch = 0
        self.position = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.dropped_per_epoch = self._dropped()

    def _dropped(self) -> int:
        """Samples left out of each epoch (fewer than one global batch)."""
        return epoch_plan(self.manifest, self.cfg, self.world_size, 0)[2]

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank)."""
        return len(epoch_plan(self.manifest, self.cfg, self.world_size, self.epoch)[0]) * self.cfg.grad_accum

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)

    def plan_fingerprint(self) -> str:
        blob = f"{self.manifest['config_hash']}|{[s['sha256'] for s in self.manifest['shards']]}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = _RankBatches(self, self.epoch, self.position)
        nw = self.cfg.num_workers
        dl = DataLoader(
            ds, batch_size=None, num_workers=nw, prefetch_factor=2 if nw else None, persistent_workers=False
        )
        for t, batch in dl:
            assert t == self.position, f"loader order broke: got position {t}, expected {self.position}"
            self.position += 1
            self.real_tokens += batch["real_tokens"]
            self.padded_tokens += batch["padded_tokens"]
            batch["epoch"] = self.epoch
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "rank": self.rank,
            "config": {
                k: getattr(self.cfg, k)
                for k in ("batch_size", "grad_accum", "same_source", "seed", "negatives_per_query", "slate_size")
            },
            "plan": self.plan_fingerprint(),
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume right after the saved position. The world size, per-rank batch and grad_accum may change when the
        global batch does not: the epoch plan depends only on it (and the seed), and the new ranks' slices of each
        global batch concatenate, in rank order, to the old ones."""
        mine = self.state_dict()
        was, now = state.get("config", {}), mine["config"]
        fixed = ("same_source", "seed", "negatives_per_query", "slate_size")
        g_was = was.get("batch_size", 0) * state.get("world_size", 0) * was.get("grad_accum", 0)
        g_now = now["batch_size"] * self.world_size * now["grad_accum"]
        problems = (
            [f"plan was {state.get('plan')!r}, now {mine['plan']!r}"] if state.get("plan") != mine["plan"] else []
        )
        problems += [f"loader.{k} was {was.get(k)!r}, now {now[k]!r}" for k in fixed if was.get(k) != now[k]]
        if g_was != g_now:
            problems.append(f"the global batch (batch_size x world x grad_accum) was {g_was}, now {g_now}")
        if int(state["position"]) % max(was.get("grad_accum", 1), 1):
            problems.append(f"position {state['position']} is inside an accumulation step")
        if problems:
            raise LoaderError(
                f"cannot resume exactly: {'; '.join(problems)}; resume with the same shards, seed and global batch"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"]) // was["grad_accum"] * now["grad_accum"]
        self.real_tokens, self.padded_tokens = int(state["real_tokens"]), int(state["padded_tokens"])
