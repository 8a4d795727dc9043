"""Paired comparisons between models and modes from the run files `python -m evaluation` wrote, for a results folder.

Each comparison is (set, b, a) with b and a given as (tag, mode); mode "first_stage" is the first-stage order the
evaluated set came with (BM25 on SciFact test, the given order on NovelEval). `report` writes paired.json (mean
difference, paired t-test, 95% bootstrap interval: trainer.evaluation.paired_test) and per_query.json (NDCG@10 of
every query for every (set, tag, mode) it read), so that later tests, pooled across seeds, say, need no run file:
run files are large and do not outlive the box that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.metrics import paired_test, per_query_of_run, run_file

Side = tuple[str, str]  # (tag, mode)


def label(side: Side) -> str:
    return "BM25" if side[1] == "first_stage" else " ".join(side)


def report(sets: dict[str, tuple[dict[str, dict[str, int]], Path]], comparisons: list[tuple[str, Side, Side]],
           out_dir: Path, seed: int | None = None) -> dict[str, dict[str, float]]:
    """sets: name -> (qrels, folder of its run files). Comparisons whose run files are missing are listed, not run.
    With `seed`, per_query.json is keyed by seed (experiments/proof_tables.py) and the other seeds in it are kept."""
    out, per_query = {}, {}

    def scores(name: str, side: Side) -> dict[str, float] | None:
        key = f"{name}.{side[0]}.{side[1]}"
        if key not in per_query:
            qrels, d = sets[name]
            if not run_file(d, name, *side).exists():
                return None
            per_query[key] = per_query_of_run(qrels, d, name, *side)
        return per_query[key]

    for name, b, a in comparisons:
        sa, sb = scores(name, a), scores(name, b)
        what = f"{name}: {label(b)} vs {label(a)}"
        if sa is None or sb is None:
            print(f"{what}: not scored (a run file is missing under {sets[name][1]})")
            continue
        r = out[what] = paired_test(sa, sb)
        print(f"{what}: {r['mean_a']:.4f} -> {r['mean_b']:.4f}, {r['diff']:+.4f} "
              f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}], p = {r['p_ttest']:.2g} (n={r['queries']})")
    out_dir.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        f = out_dir / "per_query.json"
        per_query = {**(json.loads(f.read_text()) if f.exists() else {}), f"seed{seed}": per_query}
    for file, obj in (("paired.json", out), ("per_query.json", per_query)):
        tmp = out_dir / f".{file}.tmp"
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=file == "per_query.json") + "\n")
        tmp.replace(out_dir / file)
    return out
