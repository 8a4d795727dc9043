"""`python -m trainer --config recipe.yaml key=value ...` under torchrun, the deepspeed launcher or Ray Train."""

from __future__ import annotations

import argparse
import sys

from common.typed_config import ConfigError, help_text, load
from data_pipeline.instructions import InstructionError
from data_pipeline.shards import ShardFormatError

from .checkpoint import CheckpointError
from .config import TrainConfig
from .loader import LoaderError
from .loop import train
from .preflight import PreflightError

# input, configuration and checkpoint problems the user can fix: one line each. Anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ConfigError, PreflightError, LoaderError, ShardFormatError, InstructionError, CheckpointError,
               FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer", description="Train an E2Rank model (stage 1 or 2).",
                                 epilog=help_text(TrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML recipe (see recipes/)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.max_steps=10")
    args = ap.parse_args(argv)
    try:
        cfg = load(TrainConfig, args.config, args.overrides)
        train(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
