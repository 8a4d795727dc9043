"""run.time_budget_s: the time budget lowers the run's last step (and the Trainer the LR schedule's end with it) from
measured step and evaluation times, so a run in a fixed slot ends with a full decay and an export instead of being
cut mid-schedule."""

from __future__ import annotations

import time

import pytest
import torch

from trainer.schedule import make_scheduler, retarget
from trainer.time_budget import TimeBudget, evals_between


def _budget(budget: float, steps: list[float], evals: list[float] = (), every: int = 10) -> TimeBudget:
    b = TimeBudget(budget, every, time.perf_counter())
    for s in steps:
        b.record_step(s)
    for e in evals:
        b.record_eval(e)
    return b


def _schedule(total: int, warmup: int, step: int):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(warmup, total)(opt)
    for _ in range(step):
        opt.step()
        sched.step()
    return opt, sched


def test_evaluations_counted_between_steps():
    assert evals_between(10, 0, 10) == 1 and evals_between(10, 0, 25) == 3 and evals_between(10, 10, 20) == 1
    assert evals_between(10, 12, 13) == 1  # the run's last step always evaluates
    assert evals_between(0, 0, 50) == 0


def test_budget_lowers_the_last_step_and_the_schedule_end():
    b = _budget(60.5, [5.0, 1.0, 1.0, 1.0], [3.0])  # the first step (warm-up) does not count
    fit, why = b.fit(step=4, max_steps=100)
    # 60.5 s - 2 s margin = 58.5 s left: k steps + evaluations (every 10 and at the end, 3 s each) must fit
    k = fit - 4
    assert k + 3 * evals_between(10, 4, fit) <= 58.5 < (k + 1) + 3 * evals_between(10, 4, fit + 1)
    assert fit == 47 and "1.00s/step, 3.0s/evaluation" in why
    opt, sched = _schedule(100, 20, 4)
    retarget(sched, fit)
    f = sched.lr_lambdas[0]
    assert f.total == 47 and f.warmup == 11  # still warming up: cut to a quarter of the run
    assert opt.param_groups[0]["lr"] == pytest.approx(5 / 11)  # step 5 follows the moved warm-up at once
    for _ in range(4, 46):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 36)  # step 47, the new last: decayed to ~0


def test_budget_never_raises_the_last_step_and_shortens_a_long_warmup():
    assert _budget(1e6, [1.0, 1.0]).fit(step=2, max_steps=30) is None
    fit, _ = _budget(20.5, [1.0, 1.0], every=0).fit(step=2, max_steps=100)
    assert fit == 2 + 18
    _, sched = _schedule(100, 30, 2)
    retarget(sched, fit)
    assert sched.lr_lambdas[0].warmup == 20 // 4


def test_no_budget_or_too_few_steps_changes_nothing():
    assert _budget(0, [100.0] * 50).fit(step=50, max_steps=100) is None
    assert _budget(10, [100.0]).fit(step=1, max_steps=100) is None  # one step: nothing measured past warm-up
