"""The decoder proof: E2Rank trained by this system on SciFact, evaluated on SciFact test and NovelEval.

    python -m experiments.scifact_proof prepare --out runs/proof     # CPU box: data, teachers (Ray Data), shards (Ray)
    python -m experiments.scifact_proof run --out runs/proof         # train + evaluate (any machine with deepspeed)
    python -m experiments.scifact_proof report --out runs/proof      # table, paired tests, MLflow import

`all` does the three in order. Each step reuses what is complete, so a re-run resumes.

prepare: SciFact train loses 100 random queries to a dev split (every choice is made on it, never on test); stage-1
records are the rest's qrels positives with 7 BM25 hard negatives; stage-2 slates come from the teacher job
(data_pipeline/teacher.py) in two versions, `grades` (qrels only) and `fusion` (qrels, then all-MiniLM-L6-v2 + BM25
reciprocal-rank fusion inside each grade); the Ray pipeline pre-tokenizes all three.

run, in priority order, each item skipped once `--deadline` seconds have passed (so a fixed time slot ends with
the most important results rather than none):
1. stage 1 (seed 0) from the base model, dev NDCG@10 logged every `--eval-every` steps;
2. stage 2 from that export with each teacher; the teacher with the better final dev listwise NDCG@10 is chosen;
3. evaluation of base, stage 1 and stage 2 (retrieval and listwise modes) on SciFact test (BM25 top-100, prompt from
   the top 20) and NovelEval (20 given candidates);
4. the same for the next seeds with the chosen teacher.
Training runs are real `torchrun` jobs of the trainer (DeepSpeed ZeRO-3).

report: NDCG@10 per model and mode (mean over seeds, and per seed), paired tests per comparison on per-query
NDCG@10 (seeds averaged per query; t-test and bootstrap), results.md, and every run's params and per-step metrics in
one MLflow experiment (a parent run with a child per training run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline.pretrained import default_pooling

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pypi:smollm2-135m"
TOKENIZATION = dict(query_max_len=64, doc_max_len=256, prompt_max_len=2048, prompt_doc_max_len=96)
TEACHERS = ("grades", "fusion")


def log(msg: str) -> None:
    print(f"[proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
            run_teacher(TeacherConfig(beir=str(dev), split="train", output=str(inputs[t]), order=t, slate_size=16,
                                      depth=30, source="scifact", num_workers=2), log=log)
    tok = TokenizationConfig(tokenizer=args.model, **TOKENIZATION)
    for name, src in inputs.items():
        kind = "contrastive" if name == "contrastive" else "listwise"
        run_pipeline(PipelineConfig(kind=kind, inputs=[str(src)], output=str(out / f"shards-{name}"), samples_per_shard=200,
                                    tokenization=tok, progress=False), log=log)


# -- run: train + evaluate --------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.t0 = time.time()
        self.results_path = self.out / "eval" / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def time_left(self, what: str, training: bool) -> bool:
        limit = self.args.train_deadline if training else self.args.deadline
        if limit and time.time() - self.t0 > limit:
            log(f"{'training ' if training else ''}deadline ({limit:.0f}s) passed: skipping {what}")
            return False
        return True

    def train(self, name: str, stage: int, init: str, seed: int, shards: str) -> Path | None:
        a = self.args
        folder = self.out / "train" / name
        if (folder / "export" / "e2rank.json").exists():
            return folder / "export"
        if not self.time_left(f"training {name}", True):
            return None
        dev = self.out / "scifact-dev"
        steps, batch, lr = (a.stage1_steps, a.stage1_batch, a.stage1_lr) if stage == 1 else \
            (a.stage2_steps, a.stage2_batch, a.stage2_lr)
        overrides = [f"stage={stage}", f"shards={self.out / shards}", f"model.path={init}", f"run.output_dir={folder}",
                     f"model.pooling={default_pooling(a.model)}", "model.dtype=auto", f"model.gradient_checkpointing={a.grad_ckpt}",
                     f"run.seed={seed}", f"run.max_steps={steps}", f"run.save_every={steps}", "run.log_every=1",
                     f"run.global_batch_size={batch}", f"optim.lr={lr}", f"optim.warmup_steps={max(1, int(steps * a.warmup))}",
                     f"loss.temperature={a.temperature}", "loader.negatives_per_query=3",
                     f"eval.data={dev}", "eval.split=dev", f"eval.run={dev / 'runs' / 'bm25.dev.trec'}",
                     "eval.source=scifact", f"eval.every={a.eval_every}", f"eval.max_queries={a.dev_queries}",
                     f"deepspeed.zero_stage={a.zero_stage}", f"tracking.experiment={a.experiment}",
                     f"tracking.run_name={name}", f"encode.chunk_tokens={a.chunk_tokens}"]
        overrides.append(f"tracking.tracking_uri={tracking_uri(a)}")
        if a.profile_step and name == f"stage1-seed{a.seeds[0]}":
            overrides.append(f"run.profile_step={a.profile_step}")
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
               "-m", "trainer", *overrides]
        log(f"train {name}: {' '.join(cmd[5:])}")
        t = time.time()
        with open(folder / "train.log", "a") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            log(f"train {name} FAILED (exit {r.returncode}); see {folder / 'train.log'}")
            return None
        log(f"train {name}: {time.time() - t:.0f}s; last dev: {last_dev(folder)}")
        return folder / "export"

    def evaluate(self, tag: str, model: str | Path, base: bool = False) -> None:
        if tag in self.results:
            return
        if not self.time_left(f"evaluating {tag}", False):
            return
        import torch

        from data_pipeline.instructions import InstructionTable
        from data_pipeline.text import TokenizationConfig
        from trainer.evaluation import evaluate
        from trainer.reranker import Reranker

        t = time.time()
        rer = (Reranker.from_base(str(model), pooling=default_pooling(str(model)), batch_size=64, query_format="native",
                                  tokenization=TokenizationConfig(**TOKENIZATION))
               if base else Reranker.from_pretrained(model, batch_size=64))
        ins = InstructionTable.load().lookup("scifact", False)
        res = {"query_format": rer.query_format, "dtype": str(rer.dtype).replace("torch.", "")}
        for name, es in self.eval_sets().items():
            res[name] = evaluate(rer, es, query_instruction=ins.query[0], rerank_instruction=ins.rerank,
                                 out_dir=self.out / "eval", tag=tag, progress=False)
        self.results[tag] = res
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.results, indent=1))
        log(f"eval {tag} ({time.time() - t:.0f}s): " + "; ".join(
            f"{n} retrieval {res[n]['retrieval']['NDCG@10']:.4f} listwise {res[n]['listwise']['NDCG@10']:.4f}"
            for n in self.eval_sets()))
        del rer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def eval_sets(self):
        if not hasattr(self, "_sets"):
            from trainer.evaluation import load_beir, load_rankgpt

            d = Path(self.args.data)
            self._sets = {"scifact": load_beir(d / "scifact", "test", d / "scifact" / "runs" / "bm25.top100.test.trec"),
                          "noveleval": load_rankgpt(d / "noveleval" / "data.json", d / "noveleval" / "qrels.txt")}
            if self.args.eval_queries:  # a dry run
                for es in self._sets.values():
                    es.run = {q: es.run[q] for q in sorted(es.run)[: self.args.eval_queries]}
        return self._sets

    def run(self) -> None:
        """Priority order: the headline (seed 0: stage 1, stage 2, evaluations), then the other seeds, then the
        other teacher on seed 0."""
        a = self.args
        from data_pipeline.pretrained import resolve

        base = str(resolve(a.model, weights=True))
        for i, seed in enumerate(a.seeds):
            s1 = self.train(f"stage1-seed{seed}", 1, base, seed, "shards-contrastive")
            s2 = self.train(f"stage2-{a.teacher}-seed{seed}", 2, str(s1), seed, f"shards-{a.teacher}") if s1 else None
            if i == 0:
                self.evaluate("base", base, base=True)
            for tag, path in ((f"stage1-seed{seed}", s1), (f"stage2-{a.teacher}-seed{seed}", s2)):
                if path is not None:
                    self.evaluate(tag, path)
        s1 = self.out / "train" / f"stage1-seed{a.seeds[0]}" / "export"
        for t in a.compare_teachers:
            if t != a.teacher and (s1 / "e2rank.json").exists():
                s2 = self.train(f"stage2-{t}-seed{a.seeds[0]}", 2, str(s1), a.seeds[0], f"shards-{t}")
                if s2 is not None:
                    self.evaluate(f"stage2-{t}-seed{a.seeds[0]}", s2)
        log(f"run done in {time.time() - self.t0:.0f}s")


def last_dev(folder: Path) -> dict[str, float]:
    """The last dev evaluation in a training run's metrics.jsonl."""
    m = folder / "metrics.jsonl"
    rows = [json.loads(x) for x in m.read_text().splitlines()] if m.exists() else []
    dev = [r for r in rows if any(k.startswith("dev_") for k in r)]
    return dev[-1] if dev else {}


# -- report -------------------------------------------------------------------------------------------------------
def report(args) -> str:
    from trainer.evaluation import load_beir, load_rankgpt, paired_test, per_query, read_trec_run

    out, d = Path(args.out), Path(args.data)
    res = json.loads((out / "eval" / "results.json").read_text())
    qrels = {"scifact": load_beir(d / "scifact", "test", d / "scifact" / "runs" / "bm25.top100.test.trec").qrels,
             "noveleval": load_rankgpt(d / "noveleval" / "data.json", d / "noveleval" / "qrels.txt").qrels}
    choice = args.teacher

    @functools.cache  # each table cell and test reads the same run files
    def pq(dataset: str, tag: str, mode: str) -> dict[str, float]:
        if mode == "first_stage":
            run = {q: {doc: -r for r, (doc, _) in enumerate(h)} for q, h in read_trec_run(
                d / "scifact" / "runs" / "bm25.top100.test.trec").items()} if dataset == "scifact" else \
                {q: {doc: float(len(docs) - i) for i, doc in enumerate(docs)} for q, docs in load_rankgpt(
                    d / "noveleval" / "data.json", d / "noveleval" / "qrels.txt").run.items()}
            run = {q: v for q, v in run.items() if q in qrels[dataset]}
        else:
            run = {q: dict(v) for q, v in read_trec_run(out / "eval" / f"{dataset}.{tag}.{mode}.trec").items()}
        return per_query(qrels[dataset], run)

    def averaged(dataset: str, prefix: str, mode: str) -> tuple[dict[str, float], list[str]]:
        tags = sorted(t for t in res if t == prefix or t.startswith(prefix + "-seed"))
        per = [pq(dataset, t, mode) for t in tags]
        qs = set.intersection(*(set(p) for p in per)) if per else set()
        return {q: sum(p[q] for p in per) / len(per) for q in qs}, tags

    models = [("base", "base"), ("stage 1", "stage1"), (f"stage 2 ({choice} teacher)", f"stage2-{choice}")]
    other = [t for t in TEACHERS if t != choice and any(k.startswith(f"stage2-{t}") for k in res)]
    models += [(f"stage 2 ({t} teacher)", f"stage2-{t}") for t in other]
    lines = ["| model | seeds | SciFact retrieval | SciFact listwise | NovelEval retrieval | NovelEval listwise |",
             "|---|---|---|---|---|---|"]
    bm = {ds: sum(pq(ds, "", "first_stage").values()) / len(qrels[ds]) for ds in qrels}
    lines.append(f"| BM25 (first stage) | - | {bm['scifact']:.4f} | - | {bm['noveleval']:.4f} (given order) | - |")
    for label, prefix in models:
        cells = []
        tags: list[str] = []
        for ds in ("scifact", "noveleval"):
            for mode in ("retrieval", "listwise"):
                vals, tags = averaged(ds, prefix, mode)
                per_seed = [res[t][ds][mode]["NDCG@10"] for t in tags]
                cells.append(f"{sum(vals.values()) / max(len(vals), 1):.4f}" +
                             (f" ({', '.join(f'{v:.3f}' for v in per_seed)})" if len(per_seed) > 1 else ""))
        lines.append(f"| {label} | {len(tags)} | " + " | ".join(cells) + " |")
    comparisons = [("scifact", ("stage1", "retrieval"), ("base", "retrieval")),
                   ("scifact", (f"stage2-{choice}", "listwise"), ("stage1", "retrieval")),
                   ("scifact", (f"stage2-{choice}", "listwise"), (f"stage2-{choice}", "retrieval")),
                   ("scifact", (f"stage2-{choice}", "listwise"), ("bm25", "first_stage")),
                   ("noveleval", (f"stage2-{choice}", "listwise"), ("base", "listwise")),
                   ("noveleval", (f"stage2-{choice}", "listwise"), ("stage1", "retrieval"))]
    comparisons += [("scifact", (f"stage2-{t}", "listwise"), (f"stage2-{choice}", "listwise")) for t in other]
    tests = ["", "| set | b | vs a | queries | NDCG@10 a | NDCG@10 b | b - a | 95% bootstrap CI | paired t-test p |",
             "|---|---|---|---|---|---|---|---|---|"]
    stats = []
    for ds, (bt, bm_), (at, am) in comparisons:
        a_scores = pq(ds, "", am) if am == "first_stage" else averaged(ds, at, am)[0]
        b_scores = averaged(ds, bt, bm_)[0]
        if not a_scores or not b_scores:
            continue
        t = paired_test(a_scores, b_scores)
        stats.append({"set": ds, "b": f"{bt} {bm_}", "a": f"{at} {am}", **t})
        tests.append(f"| {ds} | {bt} {bm_} | {at} {am} | {t['queries']} | {t['mean_a']:.4f} | {t['mean_b']:.4f} | "
                     f"{t['diff']:+.4f} | [{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}] | {t['p_ttest']:.2g} |")
    text = "\n".join(lines + tests)
    (out / "results.md").write_text(text + "\n")
    (out / "significance.json").write_text(json.dumps(stats, indent=1))
    print(text)
    track(out, args)
    return text


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
            rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()] \
                if (folder / "metrics.jsonl").exists() else []
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
    ap.add_argument("--stage1-lr", type=float, default=5e-5)
    ap.add_argument("--stage2-steps", type=int, default=88)  # 1 epoch of 709 slates at 8
    ap.add_argument("--stage2-batch", type=int, default=8)
    ap.add_argument("--stage2-lr", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=0.03)
    ap.add_argument("--eval-every", type=int, default=11)
    ap.add_argument("--eval-queries", type=int, default=0, help="test queries per set (0 = all; a dry run uses few)")
    ap.add_argument("--dev-queries", type=int, default=100)
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=16384)
    ap.add_argument("--grad-ckpt", default="false")
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
