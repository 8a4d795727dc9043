"""Deprecated command name, kept until 0.2.0: `python -m trainer.evaluate` is now `python -m evaluation`."""

import sys

from evaluation.cli import main

if __name__ == "__main__":
    print("[deprecated] `python -m trainer.evaluate` is now `python -m evaluation` (this name goes in 0.2.0)",
          file=sys.stderr)
    raise SystemExit(main())
