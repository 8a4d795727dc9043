"""`python -m evaluation --model DIR --data DIR [--run FILE] --out DIR`: evaluate a model on a dataset
(`--modes first_stage` scores the given first-stage run alone, with no model)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.instructions import InstructionTable

from .readers import load_eval_set
from .reranker import NotAnExport, Reranker
from .scoring import evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    ap.add_argument("--model", help="an export from the trainer (or, with --base, any HF model); not needed for "
                                    "--modes first_stage")
    ap.add_argument("--base", action="store_true", help="the model is a plain Hugging Face model (zero-shot baseline)")
    ap.add_argument("--pooling", default="last", help="with --base: last, mean or cls")
    ap.add_argument("--query-format", default="native", choices=["native", "e2rank", "plain"],
                    help="with --base: native = the model's own (sentence-transformers prompt if declared, plain "
                         "queries for other encoders, E2Rank's instruction format for decoders)")
    ap.add_argument("--data", required=True, help="a BEIR folder, or a RankGPT-style data.json")
    ap.add_argument("--qrels", help="qrels for RankGPT-style data (TREC format)")
    ap.add_argument("--run", help="first-stage TREC run for a BEIR folder (top-100 per query)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--source", default=None, help="instruction table entry (default: the dataset folder's name)")
    ap.add_argument("--modes", nargs="+", default=["retrieval", "listwise"],
                    choices=["first_stage", "retrieval", "listwise"])
    ap.add_argument("--relevance-threshold", type=int, default=None,
                    help="grade from which MRR@10 and Recall@100 count a document relevant (default: 2 for 0-3 "
                         "graded qrels as in TREC DL, else 1 as in BEIR); NDCG@10 always uses the grades")
    ap.add_argument("--prompt-k", type=int, default=20)
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="model")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="inference precision; auto = bf16 where the hardware has it (GPU, AMX/AVX512-BF16 CPUs)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store for the evaluation run (default: the one the "
                    "export's e2rank.json names); the run is nested under the export's training run")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation to MLflow")
    ap.add_argument("--no-card", action="store_true", help="leave the export's model card (README.md) as it is")
    args = ap.parse_args(argv)
    needs_model = set(args.modes) - {"first_stage"}
    if needs_model and not args.model:
        ap.error(f"--model is needed for --modes {' '.join(sorted(needs_model))} (only first_stage runs without one)")
    import os

    import torch

    from common.cpu_allocator import set_cpu_allocator

    torch.set_num_threads(os.cpu_count() or 1)  # one process: every core (OMP_NUM_THREADS=1 is for training ranks)
    if not torch.cuda.is_available():
        set_cpu_allocator("reuse")  # freed activations reused across chunks, not faulted in again
    try:
        es = load_eval_set(args.data, qrels=args.qrels, split=args.split, run=args.run, max_queries=args.max_queries)
        table = InstructionTable.load()
        source = args.source or es.name
        if not table.known(source):
            print(f"warning: source {source!r} is not in the instruction table"
                  f"{' (from the data folder name)' if not args.source else ''}: the default instructions are used; "
                  f"known: {', '.join(sorted(table.sources))}", file=sys.stderr)
        ins = table.lookup(source, allow_unknown=True)
        print(f"[eval] instructions ({source if table.known(source) else 'default'}): query {ins.query[0]!r}; "
              f"rerank {ins.rerank!r}", file=sys.stderr)
        model = None
        if needs_model:
            model = (Reranker.from_base(args.model, pooling=args.pooling, dtype=args.dtype,
                                        query_format=args.query_format)
                     if args.base else Reranker.from_pretrained(args.model, dtype=args.dtype))
        res = evaluate(model, es, query_instruction=ins.query[0], rerank_instruction=ins.rerank, modes=args.modes,
                       prompt_k=args.prompt_k, out_dir=Path(args.out), tag=args.tag if model else "input",
                       level=args.relevance_threshold)
    except (NotAnExport, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model is not None:
        res["dtype"] = str(model.dtype).replace("torch.", "")
        res["query_format"] = model.query_format
    print(json.dumps(res, indent=1))
    export = Path(args.model) if model is not None and not args.base else None
    if export is not None and (export / "e2rank.json").is_file():  # a local export: its run and its card
        from .metrics import run_file
        from .tracking import record

        runs = [run_file(Path(args.out), es.name, args.tag, m) for m in args.modes]
        from common.mlflow_access import TrackingAccessError

        try:
            rid = record(export, {es.name: res}, runs, tracking_uri=args.tracking_uri, card=not args.no_card,
                         mlflow=not args.no_mlflow)
        except TrackingAccessError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if rid:
            print(f"[eval] logged to MLflow run {rid} (nested under the export's training run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
