"""The decoder proof: E2Rank trained by this system on SciFact, evaluated on SciFact test and NovelEval.

    python -m experiments.scifact_proof prepare --out runs/proof     # CPU box: data, teachers (Ray Data), shards (Ray)
    python -m experiments.scifact_proof run --out runs/proof         # train + evaluate (any machine with deepspeed)
    python -m experiments.scifact_proof report --out runs/proof      # table, paired tests, MLflow import

`all` does the three in order. Each step reuses what is complete, so a re-run resumes.

prepare: SciFact train loses 100 random queries to a dev split (every choice is made on it, never on test); stage-1
records are the rest's qrels positives with 7 BM25 hard negatives; stage-2 slates come from the teacher job
(data_pipeline/teacher.py) in three versions: `grades` (qrels only) and `fusion` (qrels, then all-MiniLM-L6-v2 + BM25
reciprocal-rank fusion inside each grade), shuffled with the relevant documents forced in; and `grades-first-stage`
(qrels grades on the BM25 top 16 in BM25 order, as the test prompt holds them). The Ray pipeline pre-tokenizes them.

run: every choice is made on the dev split (final dev NDCG@10, averaged over seeds), never on test:
1. stage 1 from the base model for each `--stage1-grid` point (LR:temperature) and seed, dev NDCG@10 (both modes)
   logged every `--eval-every` steps; the best grid point on dev retrieval NDCG@10 is stage 1;
2. stage 2 from that export for each `--stage2-lrs` LR and seed with `--teacher`, and the other teachers on the first
   seed; the best LR on dev listwise NDCG@10 is stage 2;
3. base, the chosen stage 1 and the chosen stage 2 (every teacher at that LR), retrieval and listwise modes, on
   SciFact test (BM25 top-100, prompt from the top 20) and NovelEval (20 given candidates), as soon as each exists.
Training runs are real `torchrun` jobs of the trainer, up to `--jobs` at once (with evaluations); `--stage1-budget` /
`--stage2-budget` give each run a wall-clock budget (run.time_budget_s: the LR schedule is fitted to it), and
`--deadline` skips what would start too late, so a fixed time slot ends with results rather than none.

report: NDCG@10 per model and mode (mean over seeds, and per seed), paired tests per comparison on per-query
NDCG@10 (seeds averaged per query; t-test and bootstrap), results.md, per_query.json keyed by seed (from which
`python -m experiments.proof_tables <out>` rebuilds the pooled tables alone, once the run files are gone), and every
run's params and per-step metrics in one MLflow experiment (a parent run with a child per training run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.pretrained import default_pooling

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pypi:smollm2-135m"
TOKENIZATION = dict(query_max_len=64, doc_max_len=256, prompt_max_len=2048, prompt_doc_max_len=96)
# stage-2 slate variants: the teacher's order (data_pipeline/teacher.py `order`) and how a slate is drawn (`slate`):
# shuffled with the relevant documents forced in, or the first-stage top 16 in first-stage order, as inference's prompt
SLATES = {"grades": {"order": "grades"}, "fusion": {"order": "fusion"},
          "grades-first-stage": {"order": "grades", "slate": "first_stage"}}
TEACHERS = tuple(SLATES)


def log(msg: str) -> None:
    sys.stdout.write(f"[proof {time.strftime('%H:%M:%S')}] {msg}\n")  # one write: threads log too
    sys.stdout.flush()


# -- prepare (CPU box: Ray) ---------------------------------------------------------------------------------------
def prepare(args) -> None:
    from data_pipeline.beir import bm25_contrastive, split_dev
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run as run_pipeline
    from data_pipeline.teacher import TeacherConfig
    from data_pipeline.teacher import run as run_teacher
    from data_pipeline.text import TokenizationConfig

    out, data = Path(args.out), Path(args.data)
    dev = out / "scifact-dev"
    if not (dev / "runs" / "bm25.dev.trec").exists():
        split_dev(data / "scifact", dev, dev_queries=100, seed=0, depth=50)  # dev reranks BM25 top-50: cheaper curves
    inputs = {"contrastive": out / "stage1.jsonl", **{t: out / f"slates-{t}.jsonl" for t in TEACHERS}}
    if not inputs["contrastive"].exists():
        log(f"stage-1 records: {bm25_contrastive(dev, 'train', inputs['contrastive'], negatives=7, source='scifact')}")
    for t in TEACHERS:
        if not inputs[t].exists():
            run_teacher(TeacherConfig(beir=str(dev), split="train", output=str(inputs[t]), slate_size=16,
                                      depth=30, source="scifact", num_workers=2, **SLATES[t]))
    tok = TokenizationConfig(tokenizer=args.model, **TOKENIZATION)
    for name, src in inputs.items():
        kind = "contrastive" if name == "contrastive" else "listwise"
        keep_order = SLATES.get(name, {}).get("slate") == "first_stage"
        run_pipeline(
            PipelineConfig(
                kind=kind,
                inputs=[str(src)],
                output=str(out / f"shards-{name}"),
                samples_per_shard=200,
                tokenization=tok,
                progress=False,
                shuffle_candidates=not keep_order,
            )
        )


# -- run: train + evaluate --------------------------------------------------------------------------------------
def grid_name(stage: int, lr: float, tau: float, seed: int, teacher: str = "") -> str:
    return f"stage{stage}{'-' + teacher if teacher else ''}-lr{lr:g}-t{tau:g}-seed{seed}"


class Runner:
    """Training runs are subprocesses, evaluations threads of this process; up to `--jobs` of them at once (one GPU
    holds several small runs, which also hides each one's start-up and Python overheads)."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.t0 = time.time()
        self.results_path = self.out / "eval" / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.lock = threading.Lock()
        self.load_lock = threading.Lock()

    def time_left(self, what: str, training: bool) -> bool:
        limit = self.args.train_deadline if training else self.args.deadline
        if limit and time.time() - self.t0 > limit:
            log(f"{'training ' if training else ''}deadline ({limit:.0f}s) passed: skipping {what}")
            return False
        return True

    def train(self, name: str, stage: int, init: str, seed: int, shards: str, lr: float, tau: float) -> Path | None:
        a = self.args
        folder = self.out / "train" / name
        if (folder / "export" / "e2rank.json").exists():
            return folder / "export"
        if not self.time_left(f"training {name}", True):
            return None
        dev = self.out / "scifact-dev"
        steps, batch, budget, every = (
            (a.stage1_steps, a.stage1_batch, a.stage1_budget, a.eval_every)
            if stage == 1
            else (a.stage2_steps, a.stage2_batch, a.stage2_budget, a.stage2_eval_every or a.eval_every)
        )
        overrides = [
            f"stage={stage}",
            f"shards={self.out / shards}",
            f"model.path={init}",
            f"run.output_dir={folder}",
            f"model.pooling={default_pooling(a.model)}",
            "model.dtype=auto",
            f"model.gradient_checkpointing={a.grad_ckpt}",
            f"run.seed={seed}",
            f"loader.seed={seed}",
            f"run.max_steps={steps}",
            f"run.save_every={steps}",
            "run.log_every=1",
            f"run.time_budget_s={budget}",
            f"run.global_batch_size={batch}",
            f"optim.lr={lr}",
            f"optim.warmup_steps={max(1, int(steps * a.warmup))}",
            f"loss.temperature={tau}",
            "loader.negatives_per_query=3",
            f"eval.data={dev}",
            "eval.split=dev",
            f"eval.run={dev / 'runs' / 'bm25.dev.trec'}",
            "eval.source=scifact",
            f"eval.every={every}",
            f"eval.max_queries={a.dev_queries}",
            f"deepspeed.zero_stage={a.zero_stage}",
            f"tracking.experiment={a.experiment}",
            f"tracking.run_name={name}",
            f"encode.chunk_tokens={a.chunk_tokens}",
            f"encode.min_chunk_efficiency={a.chunk_efficiency}",
            # parallel runs each keep their own store (sqlite has one writer); `report` imports them all
            "tracking.tracking_uri="
            + (tracking_uri(a) if a.jobs == 1 else "sqlite:///" + str((folder / "mlflow.db").resolve())),
        ]
        if a.profile_step and name == self.first_run:
            overrides.append(f"run.profile_step={a.profile_step}")
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(a.nproc),
            "-m",
            "trainer",
            *overrides,
        ]
        log(f"train {name}: {' '.join(cmd[5:])}")
        t = time.time()
        with open(folder / "train.log", "a") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            log(f"train {name} FAILED (exit {r.returncode}); see {folder / 'train.log'}")
            return None
        log(f"train {name}: {time.time() - t:.0f}s; last dev: {last_dev(folder)}")
        return folder / "export"

    def evaluate(self, tag: str, model: str | Path | None, base: bool = False) -> None:
        if model is None or tag in self.results:
            return
        if not self.time_left(f"evaluating {tag}", False):
            return
        import torch

        from data_pipeline.instructions import InstructionTable
        from data_pipeline.text import TokenizationConfig
        from evaluation.reranker import Reranker
        from evaluation.scoring import evaluate

        t = time.time()
        with self.load_lock:  # from_pretrained sets torch's default dtype process-wide: loads in two threads mix dtypes
            rer = (
                Reranker.from_base(
                    str(model),
                    pooling=default_pooling(str(model)),
                    batch_size=64,
                    query_format="native",
                    tokenization=TokenizationConfig(**TOKENIZATION),
                )
                if base
                else Reranker.from_pretrained(model, batch_size=64)
            )
        ins = InstructionTable.load().lookup("scifact", False)
        res = {"query_format": rer.query_format, "dtype": str(rer.dtype).replace("torch.", ""), "model": str(model)}
        for name, es in self.eval_sets().items():
            res[name] = evaluate(
                rer,
                es,
                query_instruction=ins.query[0],
                rerank_instruction=ins.rerank,
                out_dir=self.out / "eval",
                tag=tag,
                progress=False,
            )
        with self.lock:
            self.results[tag] = res
            self.results_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            tmp.replace(self.results_path)
        log(
            f"eval {tag} ({time.time() - t:.0f}s): "
            + "; ".join(
                f"{n} retrieval {res[n]['retrieval']['NDCG@10']:.4f} listwise {res[n]['listwise']['NDCG@10']:.4f}"
                for n in self.eval_sets()
            )
        )
        del rer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def eval_sets(self):
        with self.lock:
            if not hasattr(self, "_sets"):
                from experiments.sets import real_sets

                self._sets = real_sets(self.args.data, self.args.eval_queries)  # eval_queries > 0: a dry run
            return self._sets

    def choose(self, runs: dict[tuple, Path | None], metric: str, what: str) -> tuple | None:
        """The grid point with the best final dev `metric`, averaged over seeds (dev only: test never chooses)."""
        scores: dict[tuple, list[float]] = {}
        for (point, _seed), path in runs.items():
            dev = last_dev(path.parent) if path is not None else {}
            if metric in dev:
                scores.setdefault(point, []).append(dev[metric])
        table = {str(p): {"mean": sum(v) / len(v), "per_seed": v} for p, v in scores.items()}
        with open(self.out / "choices.json", "a") as f:
            f.write(json.dumps({"what": what, "metric": metric, "grid": table}) + "\n")
        if not scores:
            log(f"{what}: no run finished with a dev {metric}")
            return None
        best = max(scores, key=lambda p: sum(scores[p]) / len(scores[p]))
        log(f"{what}: dev {metric} " + ", ".join(f"{p}: {v['mean']:.4f}" for p, v in table.items()) + f" -> {best}")
        return best

    def run(self) -> None:
        """Stage-1 grid (LR x temperature) x seeds, in parallel; the best grid point on dev (retrieval NDCG@10)
        seeds stage 2: stage-2 LRs x seeds with the chosen teacher, and the other teachers on the first seed; the
        best stage-2 LR on dev (listwise NDCG@10). Base, the chosen stage 1 and the chosen stage 2 (and the other
        teachers at that LR) are evaluated on SciFact test and NovelEval as soon as they exist."""
        a = self.args
        from common.pretrained import resolve

        base = str(resolve(a.model, weights=True))
        grid1 = [tuple(float(x) for x in g.split(":")) for g in a.stage1_grid]
        self.first_run = grid_name(1, *grid1[0], a.seeds[0])
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            evals = [pool.submit(self.evaluate, "base", base, True)] if "base" in a.test_models else []
            s1f = {
                (g, s): pool.submit(self.train, grid_name(1, *g, s), 1, base, s, "shards-contrastive", *g)
                for s in a.seeds
                for g in grid1
            }
            s1 = {k: f.result() for k, f in s1f.items()}
            g1 = self.choose(s1, "dev_retrieval_ndcg_at_10", "stage 1 (lr, temperature)")
            if g1 is None:
                return
            lr1, tau = g1
            for s in a.seeds if "stage1" in a.test_models else []:
                evals.append(pool.submit(self.evaluate, f"stage1-seed{s}", s1[(g1, s)]))
            s2f = {}
            for s in a.seeds:
                for lr in a.stage2_lrs:
                    for t in [a.teacher] + (
                        [x for x in a.compare_teachers if x != a.teacher] if s == a.seeds[0] else []
                    ):
                        init = s1[(g1, s)]
                        if init is not None:
                            s2f[(lr, t, s)] = pool.submit(
                                self.train, grid_name(2, lr, tau, s, t), 2, str(init), s, f"shards-{t}", lr, tau
                            )
            s2 = {k: f.result() for k, f in s2f.items()}
            lr2 = self.choose(
                {((lr,), s): p for (lr, t, s), p in s2.items() if t == a.teacher},
                "dev_listwise_ndcg_at_10",
                f"stage 2 LR ({a.teacher} teacher)",
            )
            if lr2 is not None and "stage2" in a.test_models:
                for (lr, t, s), p in s2.items():
                    if lr == lr2[0]:
                        evals.append(pool.submit(self.evaluate, f"stage2-{t}-seed{s}", p))
            for f in evals:
                f.result()
        log(f"run done in {time.time() - self.t0:.0f}s")


def last_dev(folder: Path) -> dict[str, float]:
    """The last dev evaluation in a training run's metrics.jsonl."""
    m = folder / "metrics.jsonl"
    rows = [json.loads(x) for x in m.read_text().splitlines()] if m.exists() else []
    dev = [r for r in rows if any(k.startswith("dev_") for k in r)]
    return dev[-1] if dev else {}


# -- report -------------------------------------------------------------------------------------------------------
def report(args) -> str:
    from evaluation.metrics import paired_test, per_query, per_query_of_run
    from evaluation.readers import read_trec_run
    from experiments.sets import real_sets

    out, d = Path(args.out), Path(args.data)
    res = json.loads((out / "eval" / "results.json").read_text())
    sets = real_sets(d)
    qrels = {name: es.qrels for name, es in sets.items()}
    choice = args.teacher

    @functools.cache  # each table cell and test reads the same run files
    def pq(dataset: str, tag: str, mode: str) -> dict[str, float]:
        if mode == "first_stage":
            run = (
                {
                    q: {doc: -r for r, (doc, _) in enumerate(h)}
                    for q, h in read_trec_run(d / "scifact" / "runs" / "bm25.top100.test.trec").items()
                }
                if dataset == "scifact"
                else {
                    q: {doc: float(len(docs) - i) for i, doc in enumerate(docs)}
                    for q, docs in sets["noveleval"].run.items()
                }
            )
            run = {q: v for q, v in run.items() if q in qrels[dataset]}
        else:
            return per_query_of_run(qrels[dataset], out / "eval", dataset, tag, mode)
        return per_query(qrels[dataset], run)

    def averaged(dataset: str, prefix: str, mode: str, seeds_of: str = "") -> tuple[dict[str, float], list[str]]:
        """Per-query NDCG@10 averaged over a model's seeds (only the seeds `seeds_of` also has, when given)."""

        def seeds(p: str) -> set[str]:
            return {t.rsplit("-seed", 1)[-1] for t in res if t == p or t.startswith(p + "-seed")}

        keep = seeds(seeds_of) if seeds_of else seeds(prefix)
        tags = sorted(
            t for t in res if (t == prefix or t.startswith(prefix + "-seed")) and t.rsplit("-seed", 1)[-1] in keep
        )
        per = [pq(dataset, t, mode) for t in tags]
        qs = set.intersection(*(set(p) for p in per)) if per else set()
        return {q: sum(p[q] for p in per) / len(per) for q in qs}, tags

    models = [("base", "base"), ("stage 1", "stage1"), (f"stage 2 ({choice} teacher)", f"stage2-{choice}")]
    other = [t for t in TEACHERS if t != choice and any(k.startswith(f"stage2-{t}-seed") for k in res)]
    models += [(f"stage 2 ({t} teacher)", f"stage2-{t}") for t in other]
    lines = [
        "| model | seeds | SciFact retrieval | SciFact listwise | NovelEval retrieval | NovelEval listwise |",
        "|---|---|---|---|---|---|",
    ]
    bm = {ds: sum(pq(ds, "", "first_stage").values()) / len(qrels[ds]) for ds in qrels}
    lines.append(f"| BM25 (first stage) | - | {bm['scifact']:.4f} | - | {bm['noveleval']:.4f} (given order) | - |")
    for label, prefix in models:
        cells = []
        tags: list[str] = []
        for ds in ("scifact", "noveleval"):
            for mode in ("retrieval", "listwise"):
                vals, tags = averaged(ds, prefix, mode)
                per_seed = [res[t][ds][mode]["NDCG@10"] for t in tags]
                cells.append(
                    f"{sum(vals.values()) / max(len(vals), 1):.4f}"
                    + (f" ({', '.join(f'{v:.3f}' for v in per_seed)})" if len(per_seed) > 1 else "")
                )
        lines.append(f"| {label} | {len(tags)} | " + " | ".join(cells) + " |")
    comparisons = [
        ("scifact", ("stage1", "retrieval"), ("base", "retrieval")),
        ("scifact", (f"stage2-{choice}", "listwise"), ("stage1", "retrieval")),
        ("scifact", (f"stage2-{choice}", "listwise"), (f"stage2-{choice}", "retrieval")),
        ("scifact", (f"stage2-{choice}", "listwise"), ("bm25", "first_stage")),
        ("scifact", (f"stage2-{choice}", "listwise"), ("stage1", "listwise")),
        ("scifact", (f"stage2-{choice}", "retrieval"), ("stage1", "retrieval")),
        ("noveleval", (f"stage2-{choice}", "listwise"), ("base", "listwise")),
        ("noveleval", (f"stage2-{choice}", "listwise"), ("stage1", "retrieval")),
    ]
    # teachers: on the seeds the other teacher was trained with (seed-matched)
    comparisons += [
        (ds, (f"stage2-{t}", "listwise"), (f"stage2-{choice}", "listwise"))
        for t in other
        for ds in ("scifact", "noveleval")
    ]
    tests = [
        "",
        "| set | b | vs a | queries | NDCG@10 a | NDCG@10 b | b - a | 95% bootstrap CI | paired t-test p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    stats = []
    for ds, (bt, bm_), (at, am) in comparisons:
        matched = bt if bt.startswith("stage2-") and at.startswith("stage2-") and bt != at else ""
        a_scores = pq(ds, "", am) if am == "first_stage" else averaged(ds, at, am, matched)[0]
        b_scores = averaged(ds, bt, bm_)[0]
        if not a_scores or not b_scores:
            continue
        t = paired_test(a_scores, b_scores)
        stats.append({"set": ds, "b": f"{bt} {bm_}", "a": f"{at} {am}", **t})
        tests.append(
            f"| {ds} | {bt} {bm_} | {at} {am} | {t['queries']} | {t['mean_a']:.4f} | {t['mean_b']:.4f} | "
            f"{t['diff']:+.4f} | [{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}] | {t['p_ttest']:.2g} |"
        )
    text = "\n".join(lines + tests + dev_curves(out))
    (out / "results.md").write_text(text + "\n")
    (out / "significance.json").write_text(json.dumps(stats, indent=1))
    write_per_query(out, res, pq, choice)
    print(text)
    track(out, args)
    return text


def write_per_query(out: Path, res: dict, pq, choice: str) -> None:
    """per_query.json keyed by seed (experiments/proof_tables.py reads it and rebuilds the pooled tables): the chosen
    teacher's stage 2 is `stage2`, another teacher's `stage2-<teacher>`; the seedless base goes into every seed."""
    from experiments.proof_tables import render

    by_seed: dict[str, dict[str, dict[str, float]]] = {}
    seeds = sorted({t.rsplit("-seed", 1)[1] for t in res if "-seed" in t})
    for tag, per_set in res.items():
        prefix, seed = tag.rsplit("-seed", 1) if "-seed" in tag else (tag, None)
        model = "stage2" if prefix == f"stage2-{choice}" else prefix
        for s in (f"seed{seed}",) if seed is not None else tuple(f"seed{x}" for x in seeds):
            for ds, r in per_set.items():
                if not isinstance(r, dict):
                    continue
                for mode in ("retrieval", "listwise"):
                    if mode in r:
                        by_seed.setdefault(s, {})[f"{ds}.{model}.{mode}"] = pq(ds, tag, mode)
                by_seed.setdefault(s, {})[f"{ds}.{model}.first_stage"] = pq(ds, "", "first_stage")
    tmp = out / ".per_query.json.tmp"
    tmp.write_text(json.dumps(by_seed, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / "per_query.json")
    (out / "tables.md").write_text(render(by_seed)[0])


def dev_curves(out: Path) -> list[str]:
    """Every training run's dev NDCG@10 (retrieval / listwise) at each evaluation, steps run, first and last train
    loss, and the grid choices (choices.json): what the LR, temperature and stage-2 LR were chosen from."""
    lines = ["", "| run | steps | loss first -> last | dev NDCG@10 retrieval / listwise by step |", "|---|---|---|---|"]
    for folder in sorted((out / "train").glob("*")):
        m = folder / "metrics.jsonl"
        rows = [json.loads(x) for x in m.read_text().splitlines()] if m.exists() else []
        train = [r for r in rows if "loss" in r]
        dev = [r for r in rows if "dev_retrieval_ndcg_at_10" in r]
        curve = ", ".join(
            f"{r['step']}: {r['dev_retrieval_ndcg_at_10']:.3f}/{r['dev_listwise_ndcg_at_10']:.3f}" for r in dev
        )
        loss = f"{train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}" if train else "-"
        lines.append(f"| {folder.name} | {train[-1]['step'] if train else 0} | {loss} | {curve or '-'} |")
    choices = out / "choices.json"
    for row in [json.loads(x) for x in choices.read_text().splitlines()] if choices.exists() else []:
        grid = ", ".join(f"{p}: {v['mean']:.4f}" for p, v in row["grid"].items())
        lines.append(f"\n{row['what']}, by mean dev {row['metric']} over seeds: {grid}")
    return lines


def track(out: Path, args) -> None:
    """Every training run's params and per-step metrics (train and dev) in one MLflow experiment: a parent run for
    the proof, a child per training run. Runs that could reach MLflow while training are already there; runs from a
    machine without it (the GPU loan) left metrics.jsonl, imported here."""
    try:
        import mlflow
    except ImportError:
        log("mlflow is not installed: metrics stay in each run's metrics.jsonl")
        return
    uri = tracking_uri(args)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(args.experiment)
    client = mlflow.MlflowClient()
    logged = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    with mlflow.start_run(run_name="scifact-proof") as parent:
        mlflow.log_artifact(str(out / "results.md"))
        mlflow.log_artifact(str(out / "significance.json"))
        if (out / "eval" / "results.json").exists():
            mlflow.log_artifact(str(out / "eval" / "results.json"))
        for folder in sorted((out / "train").glob("*")):
            if folder.name in logged:  # logged live by the trainer: link it
                client.set_tag(logged[folder.name], "mlflow.parentRunId", parent.info.run_id)
                continue
            rows = (
                [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
                if (folder / "metrics.jsonl").exists()
                else []
            )
            with mlflow.start_run(run_name=folder.name, nested=True):
                mlflow.set_tag("imported_from", str(folder / "metrics.jsonl"))
                for r in rows:
                    step = r.pop("step")
                    mlflow.log_metrics({k: float(v) for k, v in r.items() if isinstance(v, (int, float))}, step=step)
    log(f"MLflow: mlflow ui --backend-store-uri {uri}  (parent run {parent.info.run_id})")


def tracking_uri(args) -> str:
    return args.tracking_uri or f"sqlite:///{(Path(args.out) / 'mlflow.db').resolve()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "run", "report", "all"])
    ap.add_argument("--out", default="runs/proof")
    ap.add_argument("--data", default=os.environ.get("E2RANK_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher", default="grades", choices=TEACHERS, help="stage 2's teacher for every seed")
    ap.add_argument("--compare-teachers", nargs="*", default=list(TEACHERS), help="also trained on the first seed")
    ap.add_argument("--nproc", type=int, default=int(os.environ.get("E2RANK_NPROC", "2")))
    ap.add_argument("--stage1-steps", type=int, default=44)  # 2 epochs of 709 queries at 32
    ap.add_argument("--stage1-batch", type=int, default=32)
    ap.add_argument("--stage1-grid", nargs="+", default=["1e-4:0.05"], help="stage-1 LR:temperature points")
    ap.add_argument("--stage2-steps", type=int, default=88)  # 1 epoch of 709 slates at 8
    ap.add_argument("--stage2-batch", type=int, default=8)
    ap.add_argument("--stage2-lrs", type=float, nargs="+", default=[5e-5], help="stage-2 LRs (temperature: stage 1's)")
    ap.add_argument("--stage1-budget", type=float, default=0, help="run.time_budget_s of each stage-1 run (0 = none)")
    ap.add_argument("--stage2-budget", type=float, default=0, help="run.time_budget_s of each stage-2 run (0 = none)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs and evaluations at once")
    ap.add_argument(
        "--eval-every",
        type=int,
        default=11,
        help="dev evaluation every N steps (stage 1; stage 2 too unless --stage2-eval-every)",
    )
    ap.add_argument("--stage2-eval-every", type=int, default=0)
    ap.add_argument("--eval-queries", type=int, default=0, help="test queries per set (0 = all; a dry run uses few)")
    ap.add_argument("--dev-queries", type=int, default=100)
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=16384)
    ap.add_argument("--chunk-efficiency", type=float, default=0.95, help="encode.min_chunk_efficiency (lower on GPUs)")
    ap.add_argument("--grad-ckpt", default="false")
    ap.add_argument(
        "--test-models",
        nargs="*",
        default=["base", "stage1", "stage2"],
        choices=["base", "stage1", "stage2"],
        help="which models `run` scores on SciFact test and NovelEval (each costs minutes on a CPU; none: no test)",
    )
    ap.add_argument("--train-deadline", type=float, default=0, help="seconds after which `run` starts no training")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which `run` starts nothing new")
    ap.add_argument("--profile-step", type=int, default=0, help="profile this step of the first stage-1 run")
    ap.add_argument("--warmup", type=float, default=0.25, help="warmup steps as a share of each run's steps")
    ap.add_argument("--experiment", default="e2rank-scifact-proof")
    ap.add_argument("--tracking-uri", default="")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.phase in ("prepare", "all"):
        prepare(args)
    if args.phase in ("run", "all"):
        Runner(args).run()
    if args.phase in ("report", "all"):
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
