"""`python -m trainer --config recipe.yaml key=value ...` under torchrun, the deepspeed launcher or Ray Train."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.typed_config import ConfigError, load

from .config import TrainConfig
from .loop import PreflightError, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer", description="Train an E2Rank model (stage 1 or 2).")
    ap.add_argument("--config", help="YAML recipe (see recipes/)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.max_steps=10")
    args = ap.parse_args(argv)
    try:
        cfg = load(TrainConfig, args.config, args.overrides)
        train(cfg)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
