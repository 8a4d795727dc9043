"""A zero-shot baseline in its own query format against E2Rank's instruction format, same model, same candidates.

    python -m experiments.baseline_formats [--model pypi:all-minilm-l6-v2] [--out runs/baseline-formats]

SciFact test (BM25 top-100) and NovelEval, retrieval and listwise modes; documents are encoded once (they do not
depend on the query format). Writes results.json and prints NDCG@10 per format with a paired t-test per set.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pypi:all-minilm-l6-v2")
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default="runs/baseline-formats")
    args = ap.parse_args(argv)
    import torch

    from common.pretrained import default_pooling
    from common.typed_config import from_dict
    from data_pipeline.instructions import InstructionTable
    from data_pipeline.text import QUERY_TEMPLATE, TextEncoder, TokenizationConfig
    from evaluation.metrics import paired_test, per_query_of_run
    from evaluation.reranker import Reranker
    from evaluation.scoring import evaluate
    from experiments.sets import real_sets

    torch.set_num_threads(os.cpu_count() or 1)
    d, out = Path(args.data), Path(args.out)
    sets = real_sets(d)
    r = Reranker.from_base(args.model, pooling=default_pooling(args.model), query_format="native")
    native = r.text.cfg.query_template
    formats = {f"native ({r.query_format})": native, "e2rank": QUERY_TEMPLATE}
    res: dict = {"model": args.model, "formats": formats}
    for name, es in sets.items():
        ins = InstructionTable.load().lookup(name, True)
        for template in formats.values():
            r.text = TextEncoder(
                r.text.tok, from_dict(TokenizationConfig, {**r.text.cfg.__dict__, "query_template": template})
            )
            tag = "native" if template == native else "e2rank"
            res[f"{name}/{tag}"] = evaluate(
                r,
                es,
                query_instruction=ins.query[0],
                rerank_instruction=ins.rerank,
                out_dir=out,
                tag=tag,
                progress=False,
            )
        pq = {t: per_query_of_run(es.qrels, out, es.name, t, "retrieval") for t in ("native", "e2rank")}
        res[f"{name}/retrieval native vs e2rank"] = paired_test(pq["e2rank"], pq["native"])
    (out / "results.json").write_text(json.dumps(res, indent=1))
    for name in sets:
        line = " | ".join(
            f"{t} retrieval {res[f'{name}/{t}']['retrieval']['NDCG@10']:.4f} listwise "
            f"{res[f'{name}/{t}']['listwise']['NDCG@10']:.4f}"
            for t in ("native", "e2rank")
        )
        t = res[f"{name}/retrieval native vs e2rank"]
        print(f"{name}: {line} | retrieval native - e2rank {t['diff']:+.4f} (p={t['p_ttest']:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
