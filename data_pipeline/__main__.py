"""`python -m data_pipeline [--config recipe.yaml] key=value ...` (the same under `ray job submit`)."""

from __future__ import annotations

import argparse
import sys

from .config import PipelineConfig
from .job import PipelineError, run
from .typed_config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline",
        description="Validate, shard and pre-tokenize a contrastive or listwise corpus into WebDataset tars.",
    )
    ap.add_argument("--config", help="YAML recipe (see recipes/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output=runs/shards inputs=[a.jsonl]")
    args = ap.parse_args(argv)
    try:
        cfg = load(PipelineConfig, args.config, args.overrides)
        run(cfg)
    except (ConfigError, PipelineError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
