"""cluster/: every file parses and has what its tool needs; DeepSpeed references match what the trainer builds."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from common.typed_config import load
from trainer.config import TrainConfig
from trainer.zero import ds_config

ROOT = Path(__file__).resolve().parents[2]
C = ROOT / "cluster"


def test_ray_cluster_config():
    c = yaml.safe_load((C / "ray" / "cluster.yaml").read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(c)
    assert c["head_node_type"] in c["available_node_types"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in c["available_node_types"].values())
    # token authentication on every node, the dashboard on the head's loopback only
    starts = c["head_start_ray_commands"] + c["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if "ray start" in cmd)
    assert "--dashboard-host=127.0.0.1" in " ".join(c["head_start_ray_commands"]) and "0.0.0.0" not in str(c)
    assert "/home/ray/.ray/auth_token" in c["file_mounts"]
    env = yaml.safe_load((C / "ray" / "runtime_env.yaml").read_text())
    assert set(env) <= {"env_vars", "excludes", "pip", "working_dir"} and ".venv/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_kuberay_manifests():
    rc = yaml.safe_load((C / "k8s" / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    assert rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    gpu = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) > 0
    for name, module in (("rayjob-stage1.yaml", "launch/stage1.py"), ("rayjob-data.yaml", "-m data_pipeline")):
        job = yaml.safe_load((C / "k8s" / name).read_text())
        assert job["kind"] == "RayJob" and module in job["spec"]["entrypoint"]
        cfg = re.search(r"--config (\S+)", job["spec"]["entrypoint"]).group(1)
        assert (ROOT / cfg).is_file(), cfg  # the recipe it names exists
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]


def test_deepspeed_hostfile_and_env():
    for line in (C / "deepspeed" / "hostfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[\w.-]+ slots=\d+", line.strip()), line
    for line in (C / "deepspeed" / ".deepspeed_env").read_text().splitlines():
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", line), line


@pytest.mark.parametrize("name, offload", [("zero3-bf16.json", False), ("zero3-offload-bf16.json", True)])
def test_zero3_references_equal_what_the_trainer_builds(name, offload):
    ref = json.loads((C / "deepspeed" / name).read_text())
    cfg = load(TrainConfig, ROOT / "recipes" / "stage2-qwen3-0.6b.yaml",
               ["shards=/s", "model.path=/m", "run.output_dir=/o", "loader.batch_size=8",
                f"deepspeed.offload_optimizer={str(offload).lower()}", "optim.fused=false"])
    # Qwen3-0.6B on GPUs; the JSON carries DeepSpeed's torch AdamW for standalone use (the trainer passes torch's
    # fused AdamW as a client optimizer instead), and persistence resolved without knowing the device (1e5)
    assert ds_config(cfg, bf16=True, hidden=1024, cuda=True) == ref


def test_shell_scripts_parse_and_nccl_keeps_ib_and_p2p():
    for f in [*sorted((C / "slurm").glob("*.sbatch")), C / "env" / "nccl.env", *sorted((ROOT / "scripts").glob("*")),
              ROOT / ".ci" / "run"]:
        if f.suffix in ("", ".sbatch", ".env", ".sh"):
            r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
            assert r.returncode == 0, f"{f}: {r.stderr}"
    nccl = [x for x in (C / "env" / "nccl.env").read_text().splitlines() if not x.lstrip().startswith("#")]
    assert not [x for x in nccl if "IB_DISABLE" in x or "P2P_DISABLE" in x]
    assert "launch/stage2.py" in (C / "slurm" / "stage2.sbatch").read_text()
    assert "launch/stage1.py" in (C / "slurm" / "stage1.sbatch").read_text()


def test_gpu_container_is_pinned():
    d = (C / "docker" / "Dockerfile.gpu").read_text()
    assert d.startswith("#") and "\nFROM nvidia/cuda:" in d
    assert "torch==2.13.0" in d and "flash-attn==2.8.3.post2" in d and 'pip install -e ".[dev]"' in d


def test_slurm_ray_head_has_a_job_token_and_a_loopback_dashboard():
    sb = (C / "slurm" / "stage1.sbatch").read_text()
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in sb and "umask 077" in sb
    assert "--dashboard-host=127.0.0.1" in sb and "http://127.0.0.1:8265" in sb
    assert "RAY_AUTH_TOKEN=" not in sb  # the path travels, never the token
    r = subprocess.run(["bash", "-n", str(C / "slurm" / "stage1.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
