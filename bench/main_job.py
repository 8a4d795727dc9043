"""The main job's wall time after set-up, with the orderings its table exists to show, for each seed.

    python bench/main_job.py [--seeds 0 1] [--out runs/bench-main-job]

Runs `bash scripts/demo --seed S --out DIR` (set-up is a no-op once .venv matches pyproject.toml, so the time is the
job's own: pre-tokenization, stage 1, stage 2, evaluation) and merges into bench/results/main-job.json:
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-main-job"))
    ap.add_argument("--results", default=str(record.RESULTS / "main-job.json"))
    args = ap.parse_args()
    runs = {}
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)  # the main job reuses what a finished run left: measure afresh
        t = time.perf_counter()
        r = subprocess.run(["bash", "scripts/demo", "--seed", str(seed), "--out", str(out)], cwd=ROOT)
        wall = time.perf_counter() - t
        if r.returncode:
            print(f"seed {seed}: the main job failed (rc {r.returncode}); see {out / 'main.log'}")
            return 1
        res = json.loads((out / "results.json").read_text())
        times = json.loads((out / "times.json").read_text())
        tests = res["paired_tests"]
        runs[f"seed{seed}"] = {"seconds_after_setup": times["total"], "wall_s": wall, "times_s": times,
                               "ndcg10": {m: {k: v["NDCG@10"] for k, v in res[m].items() if isinstance(v, dict)
                                              and "NDCG@10" in v} for m in ("base", "stage 1", "stage 2")},
                               "claims": {c: {"diff": t["diff"], "p": t["p_ttest"], "holds": t["diff"] > 0}
                                          for c, t in tests.items()}}
        print(f"seed {seed}: {times['total']:.0f} s after set-up; " + ", ".join(
            f"{c}: {v['diff']:+.4f}" for c, v in runs[f'seed{seed}']['claims'].items()), flush=True)
    path = Path(args.results)
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {**old, "machine": record.machine(), "date": time.strftime("%Y-%m-%d"), "commit": record.commit(),
              "seconds_after_setup": max(r["seconds_after_setup"] for r in runs.values()),
              "runs": {**old.get("runs", {}), **runs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.rename(path)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
