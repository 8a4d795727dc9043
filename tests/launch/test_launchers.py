"""The literal user commands: `ray job submit ... launch/stage1.py` (Ray Train + DeepSpeed) against a Ray head on
127.0.0.1, a Ray Train worker killed mid-run, and `deepspeed launch/stage2.py` on 2 local processes and on a
2-node hostfile on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_pipeline import demo_corpus
from tests.conftest import ROOT, free_port, kill_group, require_netns
from tests.trainer_fixtures import losses, make_tiny_model, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    demo_corpus.generate(d / "corpus", species=30)
    return {"dir": d, "model": make_tiny_model(d / "tiny")}


def stage1_args(world, out: Path, *extra: str) -> list[str]:
    d = world["dir"]
    return [f"pipeline.inputs=[{d / 'corpus' / 'contrastive.jsonl'}]", "pipeline.samples_per_shard=40",
            "pipeline.tokenization.query_max_len=32", "pipeline.tokenization.doc_max_len=32",
            "pipeline.progress=false", f"train.shards={out / 'shards'}", f"train.model.path={world['model']}",
            "train.model.dtype=fp32", "train.loader.batch_size=3", "train.loader.negatives_per_query=2",
            "train.optim.lr=0.001", f"train.run.output_dir={out / 'train'}", "train.run.max_steps=6",
            "train.run.save_every=2", *extra]


def submit(head, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, "job", "submit", "--address", head.url, "--working-dir", ".", "--", "python",
                           "launch/stage1.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=head.env)


def test_ray_job_submit_stage1(ray_head, world, tmp_path):
    r = submit(ray_head, stage1_args(world, tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "[stage1] finished" in r.stdout and "succeeded" in r.stdout
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["tokenizer"]["name"] == str(world["model"])  # pre-tokenized with the model's own tokenizer
    assert sorted(losses(tmp_path / "train")) == list(range(1, 7))
    assert (tmp_path / "train" / "export" / "e2rank.json").is_file()
    # second submission: shards are current (not rebuilt), training is complete (resumes at step 6, does nothing)
    mtime = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    r2 = submit(ray_head, stage1_args(world, tmp_path))
    assert r2.returncode == 0 and (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == mtime
    assert "is complete for this config and input" in r2.stdout


def test_ray_train_worker_killed_mid_run_still_completes(ray_head, world, tmp_path):
    import psutil

    ray = str(Path(sys.executable).with_name("ray"))
    args = stage1_args(world, tmp_path, "train.run.max_steps=30", "train.run.save_every=3")
    proc = subprocess.Popen([ray, "job", "submit", "--address", ray_head.url, "--working-dir", ".", "--", "python",
                             "launch/stage1.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=ray_head.env)
    try:
        ckpt = tmp_path / "train" / "checkpoints" / "latest"
        wait_for(lambda: ckpt.is_file() or proc.poll() is not None, 300, "no checkpoint before the kill")
        victims = [
            p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in (p.info["cmdline"] or []))
        ]
        assert victims, "no Ray Train worker process found"
        killed_after = ckpt.read_text()
        os.kill(victims[-1].pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, out[-4000:]
    got = losses(tmp_path / "train")
    assert sorted(got) == list(range(1, 31))  # the right step count, nothing repeated or lost
    assert int(killed_after.replace("step", "")) < 30
    assert (tmp_path / "train" / "export" / "config.json").is_file()


@pytest.fixture(scope="module")
def listwise(ray_local, world):
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import run
    from data_pipeline.text import TokenizationConfig

    out = world["dir"] / "listwise"
    run(
        PipelineConfig(
            kind="listwise",
            inputs=[str(world["dir"] / "corpus" / "listwise.jsonl")],
            output=str(out),
            samples_per_shard=40,
            progress=False,
            tokenization=TokenizationConfig(
                tokenizer=str(world["model"]),
                query_max_len=32,
                doc_max_len=32,
                prompt_max_len=384,
                prompt_doc_max_len=24,
            ),
        )
    )
    return out


def stage2_args(world, shards: Path, out: Path) -> list[str]:
    return [
        f"shards={shards}",
        f"model.path={world['model']}",
        f"run.output_dir={out}",
        "model.dtype=fp32",
        "loader.batch_size=2",
        "run.max_steps=3",
        "run.save_every=3",
        "optim.lr=0.001",
    ]


def test_deepspeed_launcher_stage2_two_local_processes(listwise, world, tmp_path):
    require_netns()
    ds = str(Path(sys.executable).with_name("deepspeed"))
    proc = subprocess.Popen(
        [
            ds,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "launch/stage2.py",
            *stage2_args(world, listwise, tmp_path / "s2"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        kill_group(proc, grace=1)
    assert proc.returncode == 0, out[-4000:]
    assert "world_size=2" in out and "stage=2" in out
    assert sorted(losses(tmp_path / "s2")) == [1, 2, 3] and (tmp_path / "s2" / "export" / "config.json").is_file()


def test_deepspeed_launcher_two_nodes_hostfile(listwise, world, tmp_path):
    """Two "nodes" on 127.0.0.1: one launcher per node, --no_ssh, a shared hostfile."""
    require_netns()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    ds = str(Path(sys.executable).with_name("deepspeed"))
    port = free_port()
    procs = []
    try:
        for node in (0, 1):
            procs.append(
                subprocess.Popen(
                    [
                        ds,
                        "--hostfile",
                        str(hostfile),
                        "--num_nodes",
                        "2",
                        "--num_gpus",
                        "1",
                        "--no_ssh",
                        "--node_rank",
                        str(node),
                        "--master_addr",
                        "127.0.0.1",
                        "--master_port",
                        str(port),
                        "launch/stage2.py",
                        *stage2_args(world, listwise, tmp_path / "s2"),
                    ],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            kill_group(p, grace=1)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "world_size=2" in outs[0]
    assert sorted(losses(tmp_path / "s2")) == [1, 2, 3]


def test_main_job_at_reduced_size_and_rerun(world, tmp_path):
    """The README's main job end to end with a tiny model and 3 steps per stage; then again on the same folder."""
    require_netns()
    import psutil

    cmd = [
        sys.executable,
        "-m",
        "launch.main",
        "--out",
        str(tmp_path / "demo"),
        "--model",
        str(world["model"]),
        "--stage1-steps",
        "3",
        "--stage2-steps",
        "3",
        "--seed",
        "3",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc, grace=1)
    assert proc.returncode == 0, out[-4000:]
    for piece in (
        "ray job submit",
        "launch/stage1.py",
        "deepspeed",
        "launch/stage2.py",
        "| base |",
        "| stage 1 |",
        "| stage 2 |",
        "mlflow ui --backend-store-uri sqlite:///",
    ):
        assert piece in out, piece
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res) == {"base", "stage 1", "stage 2", "paired_tests"} and res["base"]["queries"] == 120
    # the ordering the job exists to show, tested per query from the written TREC runs
    tests = res["paired_tests"]
    assert set(tests) == {
        "stage 1 retrieval vs base retrieval",
        "stage 2 listwise vs stage 1 retrieval",
        "stage 2 listwise vs base listwise",
        "stage 2 listwise vs stage 2 retrieval",
        "stage 2 listwise vs BM25",
    }
    assert tests["stage 2 listwise vs BM25"]["mean_a"] == pytest.approx(res["base"]["first_stage"]["NDCG@10"], abs=1e-4)
    for claim, t in tests.items():
        assert t["queries"] == 120 and 0 <= t["p_ttest"] <= 1 and f"[main] {claim}: " in out
    assert tests["stage 2 listwise vs stage 1 retrieval"]["mean_b"] == pytest.approx(
        res["stage 2"]["listwise"]["NDCG@10"], abs=1e-4
    )
    # a decoder gets the decoder's demo settings (launch/main.py DEMO_DEFAULTS) in both stages' saved configs
    for stage, lr in (("stage1", 3e-4), ("stage2", 1e-4)):
        saved = yaml.safe_load((tmp_path / "demo" / stage / "config.yaml").read_text())
        assert saved["deepspeed"]["zero_stage"] == 0 and saved["optim"]["lr"] == lr
        assert saved["loss"]["temperature"] == 0.05 and saved["model"]["pooling"] == "last"
        assert saved["model"]["dtype"] == "auto"  # bf16 where the CPU has it natively (chosen on the dev world)
        assert saved["model"]["compile"] is True  # compiled decoder layers (measured faster per step on a CPU)
        assert saved["run"]["seed"] == saved["loader"]["seed"] == 3  # --seed: the RNG and the data order of both stages
    assert yaml.safe_load((tmp_path / "demo" / "stage1" / "config.yaml").read_text())["loader"]["batch_size"] == 8
    assert (
        "(decoder): ZeRO-0, stage-1 lr 0.0003, stage-1 batch 8 per rank, 3 + 3 steps, stage-2 lr 0.0001, "
        "temperature 0.05, training dtype auto (compiled layers)"
    ) in out
    # one tracking store: both stages in one experiment, stage 2 a child of stage 1, the exports as artifacts
    # (no mlflow.set_tracking_uri here: it exports MLFLOW_TRACKING_URI to every later test's subprocesses)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}"
    assert out.count("mlflow ui --backend-store-uri") == 1 and uri in out
    client = MlflowClient(tracking_uri=uri)
    all_runs = client.search_runs([client.get_experiment_by_name("e2rank").experiment_id])
    runs = {r.info.run_name: r for r in all_runs if r.info.run_name != "evaluation"}
    assert set(runs) == {"stage1", "stage2"}
    s1, s2 = runs["stage1"], runs["stage2"]
    # each export's evaluation: a run nested under its training run (trainer/eval_tracking.py), and its model card
    evals = {r.data.tags["mlflow.parentRunId"]: r for r in all_runs if r.info.run_name == "evaluation"}
    assert set(evals) == {s1.info.run_id, s2.info.run_id}
    m = evals[s2.info.run_id].data.metrics
    assert m["demo.listwise.ndcg_at_10"] == pytest.approx(res["stage 2"]["listwise"]["NDCG@10"])
    assert {"demo.retrieval.mrr_at_10", "demo.retrieval.recall_at_100"} <= set(m)
    arts = {a.path for a in client.list_artifacts(evals[s2.info.run_id].info.run_id)}
    assert {"paired_tests.json", "runs", "results"} <= arts
    card = (tmp_path / "demo" / "stage2" / "export" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "| stage 2 listwise vs BM25 |" in card
    # Ray token authentication was on, and no token reached the log, the head's log or any MLflow param
    from common.ray_auth import PATTERN

    assert "(token authentication;" in out
    texts = [
        out,
        (tmp_path / "demo" / "main.log").read_text(errors="replace"),
        (tmp_path / "demo" / "ray-head.log").read_text(errors="replace"),
        json.dumps([dict(r.data.params) for r in all_runs]),
    ]
    assert not [t for t in texts if PATTERN.search(t)]
    assert card.count("| 1 | 3 |") == 1 and card.count("| 2 | 3 |") == 1  # both stages, 3 steps each, in the lineage
    assert f"{res['stage 2']['listwise']['NDCG@10']:.4f}" in card
    assert s2.data.tags["mlflow.parentRunId"] == s1.info.run_id == s2.data.tags["e2rank.init_run_id"]
    for r in (s1, s2):
        assert client.get_metric_history(r.info.run_id, "loss") and r.data.params["stage"] in ("1", "2")
        assert {"config.yaml", "data_manifest.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    import mlflow

    from evaluation.reranker import Reranker

    rer = Reranker.from_pretrained(f"runs:/{s2.info.run_id}/model", tracking_uri=uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    q = rer.embed_queries(["a question"], "Given a query, retrieve documents that are relevant to the query")
    # the logged model (trainer/mlflow_model.py) predicts the same query embedding
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):  # this call only: later tests' subprocesses must not inherit it
        got = mlflow.pyfunc.load_model(f"runs:/{s2.info.run_id}/model").predict(
            ["a question"], params={"kind": "query"}
        )
    assert float((got @ q.T).item()) > 0.9999
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or []) and "raylet" in " ".join(p.info["cmdline"] or [])
    ]  # everything it started, it stopped
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    main_log = (tmp_path / "demo" / "main.log").read_text()
    assert main_log.count("is complete for this config and input") >= 2  # both corpora found complete
    assert "resumed_from=step00000003" in main_log
