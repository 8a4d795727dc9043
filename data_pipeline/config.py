"""The pipeline job's typed config (YAML + `key=value` overrides, validated before Ray starts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.typed_config import fingerprint, to_dict

from .text import TokenizationConfig

# Fields that change where or how fast the job runs, not what it writes: excluded from the config hash.
RUNTIME_ONLY = ("inputs", "output", "num_workers", "ray_address", "progress", "overwrite")


@dataclass
class PipelineConfig:
    kind: Literal["contrastive", "listwise"] = "contrastive"  # stage-1 records (query, pos, negs) or stage-2 slates
    inputs: list[str] = field(default_factory=list)  # files or folders of .jsonl / .parquet
    output: str = ""  # the shard folder (WebDataset tars + manifest.json); written under a temporary name first
    samples_per_shard: int = 1000  # samples per WebDataset tar
    tokenization: TokenizationConfig = field(default_factory=TokenizationConfig)
    instructions: str | None = None  # YAML table; None = data_pipeline/instructions.yaml
    allow_unknown_sources: bool = False  # False: a record whose source is not in the table is quarantined
    max_record_bytes: int = 1 << 20  # a longer input line is quarantined unparsed
    max_bad_fraction: float = 0.05  # the job fails (no manifest) when more records than this are bad
    min_negatives: int = 0  # contrastive: records with fewer hard negatives are quarantined
    shuffle_candidates: bool = True  # listwise: shuffle each slate (seeded) so position cannot leak the label
    seed: int = 0  # candidate shuffling of listwise slates
    num_workers: int = 2  # tokenizer actors
    ray_address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else an embedded local Ray
    progress: bool = True  # progress bars (tqdm)
    overwrite: bool = False  # rebuild an output folder that holds shards of another config

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.max_record_bytes < 16:
            raise ValueError("max_record_bytes is too small")
        if self.min_negatives < 0:
            raise ValueError("min_negatives must be >= 0")

    def content_hash(self) -> str:
        d = to_dict(self)
        for k in RUNTIME_ONLY:
            d.pop(k)
        return fingerprint(d)
