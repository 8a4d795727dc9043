"""The main job's wall time after set-up, with the orderings its table exists to show, for each seed.

    python bench/main_job.py [--seeds 0 1] [--out runs/bench-main-job]

Runs `bash scripts/demo --seed S --out DIR` (set-up is a no-op once .venv matches pyproject.toml, so the time is the
job's own: pre-tokenization, stage 1, stage 2, evaluation) and merges into bench/results/main-job.json after each seed
(`--record-only` records finished runs without re-running them):
seconds_after_setup per seed (the largest is the headline), the phase times, the NDCG@10 table and every paired test
of launch/main.py CLAIMS with whether its ordering held.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import record  # noqa: E402


def summarize(out: Path, wall: float | None) -> dict:
    """One finished main job: its times, NDCG@10 table and the paired tests of its claims."""
    res = json.loads((out / "results.json").read_text())
    times = json.loads((out / "times.json").read_text())
    return {"seconds_after_setup": times["total"], "wall_s": wall, "times_s": times,
            "ndcg10": {m: {k: v["NDCG@10"] for k, v in res[m].items() if isinstance(v, dict) and "NDCG@10" in v}
                       for m in ("base", "stage 1", "stage 2")},
            "claims": {c: {"diff": t["diff"], "p": t["p_ttest"], "holds": t["diff"] > 0}
                       for c, t in res["paired_tests"].items()}}


def merge(path: Path, runs: dict) -> None:
    """Merged after every seed, so a finished seed is recorded even if a later one is stopped."""
    old = json.loads(path.read_text()) if path.exists() else {}
    allruns = {**old.get("runs", {}), **runs}
    merged = {**old, "machine": record.machine(), "date": time.strftime("%Y-%m-%d"), "commit": record.commit(),
              "seconds_after_setup": max(r["seconds_after_setup"] for r in allruns.values()), "runs": allruns}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.rename(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-main-job"))
    ap.add_argument("--results", default=str(record.RESULTS / "main-job.json"))
    ap.add_argument("--record-only", action="store_true",
                    help="record the finished runs already under --out (seedS folders) without running them")
    args = ap.parse_args()
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        wall = None
        if not args.record_only:
            shutil.rmtree(out, ignore_errors=True)  # the main job reuses what a finished run left: measure afresh
            t = time.perf_counter()
            r = subprocess.run(["bash", "scripts/demo", "--seed", str(seed), "--out", str(out)], cwd=ROOT)
            wall = time.perf_counter() - t
            if r.returncode:
                print(f"seed {seed}: the main job failed (rc {r.returncode}); see {out / 'main.log'}")
                return 1
        run = summarize(out, wall)
        merge(Path(args.results), {f"seed{seed}": run})
        print(f"seed {seed}: {run['seconds_after_setup']:.0f} s after set-up; " + ", ".join(
            f"{c}: {v['diff']:+.4f}" for c, v in run["claims"].items()), flush=True)
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
