"""`python -m data_pipeline [--config recipe.yaml] key=value ...` (the same under `ray job submit`): pre-tokenize.
`python -m data_pipeline teacher [--config recipe.yaml] key=value ...`: graded listwise slates (teacher.py).
`python -m data_pipeline verify DIR [--no-checksum]`: every shard against the manifest; exit 1 naming those to
rebuild."""

from __future__ import annotations

import argparse
import logging
import sys

from common.typed_config import ConfigError, help_text, load

from .config import PipelineConfig
from .job import PipelineError, run


def teacher_main(argv: list[str]) -> int:
    from .teacher import TeacherConfig
    from .teacher import run as run_teacher

    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline teacher",
        description=(
            "Graded listwise slates from a BEIR split's qrels, ordered inside each grade by BM25, a model or both "
            "(Ray Data)."
        ),
        epilog=help_text(TeacherConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML recipe")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. beir=DIR output=slates.jsonl order=fusion")
    args = ap.parse_args(argv)
    try:
        run_teacher(load(TeacherConfig, args.config, args.overrides))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def verify_main(argv: list[str]) -> int:
    from .shards import ShardFormatError, verify

    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline verify",
        description="Check every shard of a folder against its manifest (size and sha256).",
    )
    ap.add_argument("dir")
    ap.add_argument("--no-checksum", action="store_true", help="sizes only (fast)")
    args = ap.parse_args(argv)
    try:
        bad = verify(args.dir, checksum=not args.no_checksum)
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, why in bad.items():
        print(f"{name}: {why}")
    if bad:
        print(
            f"{len(bad)} shard(s) to rebuild; re-run the pipeline with the same config and output={args.dir}: "
            "it rebuilds only these",
            file=sys.stderr,
        )
        return 1
    print(f"{args.dir}: every shard matches the manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # the job's progress lines
    if argv[:1] == ["teacher"]:
        return teacher_main(argv[1:])
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline",
        description="Validate, shard and pre-tokenize a contrastive or listwise corpus into WebDataset tars.",
        epilog=help_text(PipelineConfig) + "\n\nsubcommands: teacher (graded listwise slates), verify DIR (shards "
        "against their manifest); each has --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
