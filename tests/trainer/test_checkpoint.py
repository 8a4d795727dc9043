"""Checkpoints on real processes (DeepSpeed ZeRO-3 over gloo ranks): exact resume after a stop, after a SIGKILL
between saves and inside a save, after a full disk during a save, and on another number of ranks."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, kill_group, require_netns
from tests.trainer_fixtures import losses, torchrun, train_cmd, wait_for

pytestmark = pytest.mark.slow
SLOW_SAVE = ROOT / "tests" / "scripts" / "slow_save"  # sitecustomize: torch.save into a *.partial folder waits


def assert_same_losses(out, ref, steps=6, rel=1e-6, keys=("loss", "infonce", "accuracy", "lr", "grad_norm")):
    want, got = losses(ref), losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for k in keys:
            assert got[step][k] == pytest.approx(want[step][k], rel=rel, abs=1e-9), (step, k)


def test_exact_resume_after_a_stop(setup, full_run):
    """N steps == N/2 steps, process gone, then N/2 more from the checkpoint: the same losses step for step."""
    out = setup["dir"] / "resumed"
    r1 = torchrun(train_cmd(setup["c"], setup["model"], out, "run.stop_after_steps=3"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step00000003" and not (out / "export").exists()
    r2 = torchrun(train_cmd(setup["c"], setup["model"], out))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed_from=step00000003" in r2.stdout
    assert_same_losses(out, full_run[0], keys=("loss", "infonce", "accuracy", "lr", "grad_norm", "masked_negatives"))


def test_exact_resume_bf16_zero0_master_weights(setup):
    """ZeRO-0 in bf16 (trainer/master_weights.py: fp32 masters and Adam moments in the optimizer's state, not in
    DeepSpeed's partitions): 3 steps, process gone, 3 more equal an uninterrupted 6-step run, step for step."""
    require_netns()
    args = ("deepspeed.zero_stage=0", "model.dtype=bf16")
    ref, out = setup["dir"] / "z0bf16-full", setup["dir"] / "z0bf16-resumed"
    r0 = torchrun(train_cmd(setup["c"], setup["model"], ref, *args))
    assert r0.returncode == 0, r0.stdout[-3000:] + r0.stderr[-3000:]
    assert "optimizer=fp32-master AdamW (trainer)" in r0.stdout
    r1 = torchrun(train_cmd(setup["c"], setup["model"], out, "run.stop_after_steps=3", *args))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = torchrun(train_cmd(setup["c"], setup["model"], out, *args))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed_from=step00000003" in r2.stdout
    assert_same_losses(out, ref)


def test_resume_with_another_zero_stage_is_refused(setup):
    """A ZeRO-3 checkpoint is not loaded into a ZeRO-2 engine (the main job's --zero-stage on a reused --out): one
    clear error naming both stages, and the checkpoint is left as it was."""
    require_netns()
    out = setup["dir"] / "zero3then2"
    r1 = torchrun(train_cmd(setup["c"], setup["model"], out, "run.stop_after_steps=1"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = torchrun(train_cmd(setup["c"], setup["model"], out, "deepspeed.zero_stage=2"))
    assert r2.returncode != 0
    assert "was written with DeepSpeed ZeRO-3 and this run asks for ZeRO-2" in r2.stdout + r2.stderr
    # torchrun prints its own ChildFailedError traceback for any non-zero worker; the workers print none
    assert not re.search(r'File ".*/(trainer|launch|common)/', r2.stderr), r2.stderr[-3000:]
    assert "exitcode  : 2" in r2.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000001" and not (out / "export").exists()


def test_checkpoint_from_the_old_lr_schedule_is_refused_clearly(setup):
    """A checkpoint written before trainer/schedule.py holds DeepSpeed WarmupDecayLR's state: resuming it names the
    checkpoint and the way out, instead of LambdaLR's bare KeyError('lr_lambdas')."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    require_netns()
    out = setup["dir"] / "old_schedule"
    r1 = torchrun(train_cmd(setup["c"], setup["model"], out, "run.stop_after_steps=1", "deepspeed.zero_stage=2"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    states = out / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt"
    ckpt = torch.load(states, weights_only=False)
    assert set(ckpt["lr_scheduler"]) >= {"lr_lambdas", "last_epoch"}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ckpt["lr_scheduler"] = WarmupDecayLR(opt, total_num_steps=6, warmup_num_steps=2).state_dict()  # as written then
    torch.save(ckpt, states)
    r2 = torchrun(train_cmd(setup["c"], setup["model"], out, "deepspeed.zero_stage=2"))
    assert r2.returncode != 0
    assert "was written with the old LR schedule (DeepSpeed WarmupDecayLR" in r2.stdout + r2.stderr
    assert not (out / "export").exists()


def test_exact_resume_after_a_kill(setup, full_run):
    """SIGKILL the whole job mid-run; the restart resumes from the last complete checkpoint and matches."""
    require_netns()
    out = setup["dir"] / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *train_cmd(setup["c"], setup["model"], out, "run.max_steps=40", "run.save_every=4")]
    ref_cmd = train_cmd(setup["c"], setup["model"], setup["dir"] / "ref40", "run.max_steps=40", "run.save_every=40",
                        "run.export=false")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").is_file() or proc.poll() is not None, 240, "no checkpoint")
    finally:
        kill_group(proc, grace=0, term=False)
    killed_at = (out / "checkpoints" / "latest").read_text()
    r = torchrun(train_cmd(setup["c"], setup["model"], out, "run.max_steps=40", "run.save_every=4",
                           "run.keep_checkpoints=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed_from={killed_at}" in r.stdout
    # retention: the resumed run's saves left the newest two, and the export read the last
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000036", "step00000040"]
    rr = torchrun(ref_cmd)
    assert rr.returncode == 0, rr.stderr[-3000:]
    assert_same_losses(out, setup["dir"] / "ref40", steps=40, keys=("loss",))
    assert not list((out / "checkpoints").glob(".latest.tmp*"))


@pytest.mark.parametrize("point", ["folder created", "shards half written", "all written, not yet renamed"])
def test_sigkill_inside_a_save_resumes_from_the_previous_checkpoint(setup, full_run, point):
    """Saves every 2 steps; every write of a save is slowed down (tests/scripts/slow_save) and the whole job is
    SIGKILLed at a point inside the save of step 4. The restart removes the half-written step-4 folder, resumes
    from step 2, and its losses equal the uninterrupted run's."""
    require_netns()
    out = setup["dir"] / f"killsave-{point.split()[0]}"
    part = out / "checkpoints" / "step00000004.partial"
    ready = {"folder created": part.is_dir,
             "shards half written": lambda: any(part.glob("*optim_states.pt")),
             "all written, not yet renamed": lambda: (part / "trainer_state.json").is_file()}[point]
    env = {**os.environ, "E2RANK_TEST_SLOW_SAVE": "0.4",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SLOW_SAVE), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *train_cmd(setup["c"], setup["model"], out, "run.save_every=2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 300, f"the save never reached: {point}")
    finally:
        kill_group(proc, grace=0, term=False)
    assert part.is_dir(), "the kill landed outside the save"
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    assert not (out / "checkpoints" / "step00000004").exists()
    r = torchrun(train_cmd(setup["c"], setup["model"], out, "run.save_every=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed_from=step00000002" in r.stdout
    assert "removed what an interrupted save left: step00000004.partial" in r.stdout
    assert_same_losses(out, full_run[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == \
        ["step00000002", "step00000004", "step00000006"]


def test_disk_full_during_a_save_then_rerun_with_space(setup, full_run, tmp_path):
    """The checkpoint folder is a tmpfs (private mount namespace, as root) that holds one checkpoint and a half:
    the save of step 4 runs out of space. One clear error, `latest` still names step 2, the half-written folder is
    marked partial; after the disk grows the same command resumes from step 2 and matches the uninterrupted run."""
    require_netns()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private tmpfs")
    one = sum(f.stat().st_size for f in (full_run[0] / "checkpoints" / "step00000003").rglob("*") if f.is_file())
    out = tmp_path / "run"
    ck = out / "checkpoints"
    cmd = shlex.join([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      *train_cmd(setup["c"], setup["model"], out, "run.save_every=2")])
    script = f"""
set -u
mkdir -p {ck} && mount -t tmpfs -o size={one * 3 // 2} tmpfs {ck} || exit 90
{cmd} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc
ls -a {ck} > {tmp_path}/first.ls; cat {ck}/latest > {tmp_path}/first.latest
mount -o remount,size=2g {ck}
{cmd} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
cp -r {ck} {tmp_path}/checkpoints
"""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       start_new_session=True)
    if r.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr[-300:]}")
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() != "0"
    assert "error: checkpoint" in err and "step00000004 could not be written: the disk is full" in err, err[-3000:]
    assert "the last complete checkpoint is step00000002" in err
    assert (tmp_path / "first.latest").read_text() == "step00000002"
    listed = (tmp_path / "first.ls").read_text().split()
    assert "step00000002" in listed and "step00000004" not in listed
    second = (tmp_path / "second.out").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()[-3000:]
    assert "resumed_from=step00000002" in second and "step00000004.partial" in second
    assert_same_losses(out, full_run[0])
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(setup, full_run, first, then):
    """Node loss: 3 steps on `first` ranks, then the rest on `then` ranks from the same checkpoint. The global batch
    is kept (6 queries: 2 ranks x 3 or 1 rank x 6, the per-rank batch adjusted at resume) and so is the data order,
    so in-batch negatives are the same set and every step's loss equals the 2-rank uninterrupted run's, to
    round-off (padding and reduction order differ)."""
    require_netns()
    out = setup["dir"] / f"world{first}to{then}"
    r1 = torchrun(
        train_cmd(setup["c"], setup["model"], out, "run.stop_after_steps=3", f"loader.batch_size={6 // first}"),
        nproc=first,
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = torchrun(train_cmd(setup["c"], setup["model"], out), nproc=then)  # asks for batch 3 per rank
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "resumed_from=step00000003" in r2.stdout
    assert f"written by {first} ranks) on {then}: global batch 6 kept as loader.batch_size={6 // then}" in r2.stdout
    assert (out / "checkpoints" / "step00000003.universal" / "zero").is_dir()
    assert_same_losses(out, full_run[0], rel=1e-5)  # seen: 1.3e-6 at most
