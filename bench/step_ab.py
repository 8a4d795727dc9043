"""Training steps of one config under settings A, B, ..., run alternately (A B A B) so that a box whose speed drifts
within the hour affects every setting alike. Each run is `torchrun --nproc_per_node 2 -m trainer` for `--steps` steps
(1 thread per process, no checkpoint, no export); the figure is the median of steps 3..N (the first two warm up).

    python bench/step_ab.py --config runs/demo/stage1/config.yaml --label stage1-chunks \\
        --variant eff095 encode.min_chunk_efficiency=0.95 --variant eff06 encode.min_chunk_efficiency=0.6

Prints each run, then each setting's median step against the first's, and merges them into
bench/results/step-ab.json under `runs[label]` (ratios: first setting's step time / each other's, so > 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import record  # noqa: E402

PHASES = ("step_time_s", "time_forward_s", "time_backward_s", "time_optimizer_s")


def run_once(config: str, steps: int, overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
           "--config", config, f"run.output_dir={out}", f"run.max_steps={steps}", "run.save_every=1000000",
           "run.export=false", f"tracking.tracking_uri=sqlite:///{out}.db", *overrides]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{' '.join(overrides) or 'defaults'}: the trainer failed (exit {r.returncode}), see {log}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kept = rows[2:]
    med = {k: statistics.median(x[k] for x in kept) for k in PHASES}
    med.update(forwards=statistics.mean(x["forwards"] for x in rows),
               padding_efficiency=statistics.mean(x["padding_efficiency"] for x in rows),
               page_faults=statistics.median(x.get("page_faults", 0) for x in kept),
               steps_s=[round(x["step_time_s"], 3) for x in rows])
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a trainer config.yaml (e.g. a main-job stage's)")
    ap.add_argument("--label", required=True, help="the run's key in step-ab.json")
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar="ARG",
                    help="a setting: its name, then trainer overrides (none: the config as it is)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--results", default=str(record.RESULTS / "step-ab.json"))
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the first two steps are not counted)")
    names = [v[0] for v in args.variant]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="step-ab-") as work:
        for rep in range(args.reps):
            for name, *overrides in args.variant:
                m = run_once(args.config, args.steps, overrides, Path(work) / f"{name}-{rep}")
                runs[name].append(m)
                print(f"{name} run {rep + 1}: step {m['step_time_s']:.2f} s (forward {m['time_forward_s']:.2f}, "
                      f"backward {m['time_backward_s']:.2f}, optimizer {m['time_optimizer_s']:.2f}), "
                      f"{m['forwards']:.1f} forwards, real/padded {m['padding_efficiency']:.3f}", flush=True)
    step = {n: statistics.median(m["step_time_s"] for m in runs[n]) for n in names}
    ratios = {f"{args.label}:{names[0]}/{n}": step[names[0]] / step[n] for n in names[1:]}
    for n in names[1:]:
        print(f"{names[0]} / {n}: median step {step[names[0]]:.2f} / {step[n]:.2f} s = {step[names[0]] / step[n]:.2f}x")
    record.merge(Path(args.results), ratios, args.label, {
        "config": args.config, "steps": args.steps, "reps": args.reps,
        "variants": {v[0]: v[1:] for v in args.variant}, "median_step_s": step, "runs": runs,
        "commit": record.commit(), "date": time.strftime("%Y-%m-%d"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
