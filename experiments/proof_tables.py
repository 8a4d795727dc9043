"""Every table of a proof's results README, rebuilt from its per_query.json alone (run files do not outlive a box).

    python -m experiments.proof_tables experiments/results/<proof>     # prints the tables, writes tables.md there

per_query.json holds NDCG@10 of every query, keyed by seed, then by `<set>.<model>.<mode>`:

    {"seed0": {"scifact.stage2.listwise": {"<qid>": 0.73, ...}, "scifact.stage2.first_stage": {...}, ...},
     "seed1": {...}}

with model in base / stage1 / stage2 (or stage2-<teacher> for a teacher that is not the proof's choice) and mode in
first_stage / retrieval / listwise. Seeds pool the way the proof's `report` does: a model's per-query scores are
averaged over the seeds that have them, then compared query by query (paired t-test and 95% bootstrap interval,
trainer.evaluation.paired_test), so n stays the number of queries and a seed never counts as extra queries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.metrics import paired_test

PerQuery = dict[str, dict[str, dict[str, float]]]  # seed -> "<set>.<model>.<mode>" -> qid -> NDCG@10
SETS = (("scifact", "SciFact test"), ("noveleval", "NovelEval"))
MODELS = ("base", "stage1", "stage2")
# issue 28's targets first, then the chain that explains them: (set, b, a) as "<model>.<mode>"
COMPARISONS = [("scifact", "stage2.listwise", "stage2.retrieval"),
               ("scifact", "stage2.listwise", "stage2.first_stage"),
               ("scifact", "stage2.retrieval", "stage1.retrieval"),
               ("scifact", "stage2.listwise", "stage1.retrieval"),
               ("scifact", "stage1.retrieval", "base.retrieval"),
               ("noveleval", "stage2.listwise", "base.listwise"),
               ("noveleval", "stage2.listwise", "stage1.listwise"),
               ("noveleval", "stage2.listwise", "stage2.retrieval"),
               ("noveleval", "stage2.retrieval", "stage1.retrieval")]


def load(folder: Path) -> PerQuery:
    f = folder / "per_query.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no per-query scores here (a proof's `report` or paired_report.py writes them)")
    data = json.loads(f.read_text())
    bad = [k for k in data if not k.startswith("seed")]
    if bad:
        raise ValueError(f"{f}: top-level keys must be seeds (seed0, seed1, ...), "
                         f"got {bad[:3]}: a flat file from an older report needs `--seed N` to be wrapped")
    return data


def pooled(pq: PerQuery, key: str) -> tuple[dict[str, float], list[str]]:
    """key's per-query NDCG@10 averaged over the seeds that scored it (queries every such seed has), and the seeds."""
    seeds = sorted(s for s in pq if key in pq[s])
    if not seeds:
        return {}, []
    qs = set.intersection(*(set(pq[s][key]) for s in seeds))
    return {q: sum(pq[s][key][q] for s in seeds) / len(seeds) for q in sorted(qs)}, seeds


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def models_table(pq: PerQuery) -> list[str]:
    """NDCG@10 per model and mode: the mean over seeds, each seed's in brackets when there are several."""
    cols = [(s, m) for s, _ in SETS for m in ("retrieval", "listwise")]
    lines = ["| model | seeds | " + " | ".join(f"{label} {m}" for s, label in SETS for m in ("retrieval", "listwise"))
             + " |", "|---|---|" + "---|" * len(cols)]
    first = []
    for s, _ in SETS:
        scores, _ = pooled(pq, f"{s}.stage2.first_stage")
        first.append(f"{mean(scores):.4f}" if scores else "-")
        first.append("-")
    lines.append("| first stage (BM25 / given order) | - | " + " | ".join(first) + " |")
    extra = sorted({k.split(".")[1] for s in pq for k in pq[s]} - set(MODELS))
    for model in (*MODELS, *extra):
        cells, n = [], 0
        for s, m in cols:
            key = f"{s}.{model}.{m}"
            scores, seeds = pooled(pq, key)
            n = max(n, len(seeds))
            each = ", ".join(f"{mean(pq[x][key]):.4f}" for x in seeds)
            per_seed = f" ({each})" if len(seeds) > 1 else ""
            cells.append(f"{mean(scores):.4f}{per_seed}" if scores else "-")
        if n:
            lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return lines


def paired_tests(pq: PerQuery, comparisons=COMPARISONS) -> tuple[list[str], list[dict]]:
    """Paired tests on per-query scores pooled over the seeds both sides share; comparisons with a missing side are
    listed as not scored rather than dropped."""
    lines = [
        "| set | b vs a | seeds | queries | NDCG@10 a -> b | b - a [95% CI] | p |",
        "|---|---|---|---|---|---|---|",
    ]
    stats = []
    for s, b, a in comparisons:
        seeds = sorted(x for x in pq if f"{s}.{a}" in pq[x] and f"{s}.{b}" in pq[x])
        if not seeds:
            lines.append(f"| {s} | {b} vs {a} | - | - | not scored | - | - |")
            continue
        sub = {x: pq[x] for x in seeds}
        t = paired_test(pooled(sub, f"{s}.{a}")[0], pooled(sub, f"{s}.{b}")[0])
        stats.append({"set": s, "b": b, "a": a, "seeds": seeds, **t})
        lines.append(
            f"| {s} | {b} vs {a} | {len(seeds)} | {t['queries']} | {t['mean_a']:.4f} -> {t['mean_b']:.4f} | "
            f"{t['diff']:+.4f} [{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}] | {t['p_ttest']:.2g} |"
        )
    return lines, stats


def per_seed_targets(pq: PerQuery) -> list[str]:
    """The per-seed half of the targets: stage-2 listwise against the first stage (BM25) on SciFact, each seed."""
    lines = ["| seed | SciFact stage2 listwise vs first stage | b - a [95% CI] | p |", "|---|---|---|---|"]
    for seed in sorted(pq):
        a, b = pq[seed].get("scifact.stage2.first_stage"), pq[seed].get("scifact.stage2.listwise")
        if a and b:
            t = paired_test(a, b)
            lines.append(
                f"| {seed} | {t['mean_a']:.4f} -> {t['mean_b']:.4f} | {t['diff']:+.4f} "
                f"[{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}] | {t['p_ttest']:.2g} |"
            )
    return lines


def render(pq: PerQuery) -> tuple[str, list[dict]]:
    t_lines, stats = paired_tests(pq)
    text = "\n".join(
        [
            "NDCG@10 (mean over seeds; each seed in brackets):",
            "",
            *models_table(pq),
            "",
            "Paired tests, per-query NDCG@10 averaged over the seeds both sides have:",
            "",
            *t_lines,
            "",
            *per_seed_targets(pq),
        ]
    )
    return text + "\n", stats


def wrap(flat: dict[str, dict[str, float]], seed: int) -> PerQuery:
    """An older report's flat {"<set>.<tag>.<mode>": scores} as one seed's entry."""
    return {f"seed{seed}": flat}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a results folder holding per_query.json")
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the file is an older flat one of this seed: rewrite it keyed by seed first",
    )
    args = ap.parse_args(argv)
    f = args.folder / "per_query.json"
    if args.seed is not None:
        flat = json.loads(f.read_text())
        if all(k.startswith("seed") for k in flat):
            raise SystemExit(f"{f}: already keyed by seed")
        tmp = f.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(wrap(flat, args.seed), indent=1, sort_keys=True) + "\n")
        tmp.replace(f)
    text, stats = render(load(args.folder))
    for name, body in (("tables.md", text), ("tests.json", json.dumps(stats, indent=1) + "\n")):
        tmp = args.folder / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(args.folder / name)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
