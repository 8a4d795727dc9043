"""Streaming shards with webdataset, for clusters without a shared filesystem (object storage, HTTP, any `pipe:`).

The random-access loader (loader.py) needs every shard on a filesystem every rank can seek in. Here each rank opens
its shards as byte streams through webdataset's `gopen` (`https://...`, `pipe:aws s3 cp ... -`, local paths) and
reads them front to back. The manifest (a small local file) still plans everything:

- Shards: a seeded permutation per epoch, dealt to ranks round-robin (webdataset's `split_by_node`, but seeded and
  known to every rank). Needs at least as many shards as ranks.
- Equal batch counts per rank (unequal counts hang ZeRO-3): every rank knows every rank's sample count from the
  manifest and stops at the smallest rank's number of full micro-batches (a multiple of grad_accum); the rest of
  the epoch is dropped and counted (`dropped_per_epoch`).
- Order inside a rank: its shards in order through a seeded shuffle buffer (`shuffle_buffer` samples).
- Integrity: each shard must yield the number of samples its manifest entry says; a short or cut stream stops
  training with the shard's URL (no sha256: the bytes are not kept).
- Resume: exact. The cursor is the micro-batch count in the epoch; a resumed rank re-reads its stream from the
  epoch's start and skips what was consumed (same shards, same shuffle), paying that re-read. Resuming on another
  world size is refused: the deal of shards to ranks depends on it (use local shards for that).
- Global batches mix sources (`same_source` needs random access) and in-batch negatives come from the ranks' own
  streams; the data order differs from the random-access loader's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.shards import REBUILD, ShardFormatError, decode_sample

from .loader import Collator, LoaderConfig, LoaderError, ShardLoader


def shard_samples(entry: dict[str, Any]) -> int:
    return sum(n for _, n in entry["source_runs"])


def stream_plan(manifest: dict, seed: int, epoch: int, world_size: int, batch_size: int, grad_accum: int
                ) -> tuple[list[list[int]], int, int]:
    """(shard indices per rank, micro-batches per rank, samples dropped) for one epoch."""
    shards = manifest["shards"]
    if len(shards) < world_size:
        raise LoaderError(f"streaming needs at least one shard per rank: {len(shards)} shards for {world_size} ranks; "
                          "rebuild with a smaller samples_per_shard")
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(shards)).tolist()
    per_rank = [order[r::world_size] for r in range(world_size)]
    counts = [sum(shard_samples(shards[i]) for i in idx) for idx in per_rank]
    n = min(counts) // batch_size // grad_accum * grad_accum
    if n == 0:
        raise LoaderError(f"streaming: the smallest rank's shards hold {min(counts)} samples, not one full "
                          f"accumulation step of {batch_size} x {grad_accum}; lower the batch size or add data")
    return per_rank, n, sum(counts) - n * batch_size * world_size


class StreamingShardLoader(ShardLoader):
    """ShardLoader's interface (iterate the rest of the epoch, `state_dict()` / `load_state_dict()`) over streams."""

    def _plan(self, epoch: int):
        c = self.cfg
        return stream_plan(self.manifest, c.seed, epoch, self.world_size, c.batch_size, c.grad_accum)

    def _dropped(self) -> int:
        return self._plan(0)[2]

    def __len__(self) -> int:
        return self._plan(self.epoch)[1]

    def plan_fingerprint(self) -> str:
        return "stream:" + super().plan_fingerprint()

    def url(self, i: int) -> str:
        return self.cfg.stream_url.format(name=self.manifest["shards"][i]["name"])

    def _samples(self, shard_ids: list[int]) -> Iterator[dict[str, Any]]:
        """Decoded samples of these shards, in order, each shard checked for its manifest sample count."""
        from webdataset.tariterators import tarfile_samples

        for i in shard_ids:
            url, want, got = self.url(i), shard_samples(self.manifest["shards"][i]), 0
            try:
                for s in tarfile_samples([{"url": url}]):
                    members = {k: v for k, v in s.items() if not k.startswith("__")}
                    yield decode_sample(s["__key__"], members, self.kind, url)
                    got += 1
            except ShardFormatError:
                raise
            except Exception as e:  # a failed download, a cut stream, a corrupt tar
                raise ShardFormatError(f"{url}: streaming failed after {got} of {want} samples "
                                       f"({type(e).__name__}: {e}); {REBUILD}") from e
            if got != want:
                raise ShardFormatError(f"{url}: streamed {got} samples, its manifest entry says {want}; {REBUILD}")

    def _shuffled(self, shard_ids: list[int]) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.cfg.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        buf: list[dict[str, Any]] = []
        for s in self._samples(shard_ids):
            buf.append(s)
            if len(buf) >= max(self.cfg.shuffle_buffer, 1):
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        per_rank, n, _ = self._plan(self.epoch)
        collate = Collator(self.kind, self.cfg, self.pad_id, self.slate_size, self.epoch)
        stream, b = self._shuffled(per_rank[self.rank]), self.cfg.batch_size
        for _ in range(self.position * b):  # resume: what this epoch already consumed
            next(stream)
        while self.position < n:
            batch = collate([next(stream) for _ in range(b)])
            batch["position"], batch["global_source"] = self.position, "*"
            self.position += 1
            self.real_tokens += batch["real_tokens"]
            self.padded_tokens += batch["padded_tokens"]
            batch["epoch"] = self.epoch
            yield batch
        stream.close()
        self.epoch += 1
        self.position = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world_size") != self.world_size or state.get("config") != self.state_dict()["config"]:
            raise LoaderError(
                f"cannot resume a streamed epoch on another world size or batch: it was {state.get('world_size')} "
                f"ranks x {state.get('config', {}).get('batch_size')}, now {self.world_size} x {self.cfg.batch_size} "
                "(shards are dealt to ranks by world size; use local shards to change it)")
        super().load_state_dict(state)


def make_loader(shard_dir: str | Path, cfg: LoaderConfig, **kw) -> ShardLoader:
    """The reader for this configuration: random access to local shards (exact resume on any world size with the
    same global batch), or webdataset streaming from URLs when loader.stream_url is set (StreamingShardLoader)."""
    if cfg.stream_url:
        return StreamingShardLoader(shard_dir, cfg, **kw)
    return ShardLoader(shard_dir, cfg, **kw)
