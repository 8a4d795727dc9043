"""run.time_budget_s: the Trainer lowers max_steps (and the LR schedule's end) from measured step and evaluation
times, so a run in a fixed slot ends with a full decay and an export instead of being cut mid-schedule."""

from __future__ import annotations

import time

import pytest
import torch

from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.schedule import make_scheduler


class _Engine:  # what fit_budget touches of a DeepSpeed engine: its (real) LR scheduler, `step` optimizer steps in
    def __init__(self, total: int, warmup: int, step: int):
        self.opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.lr_scheduler = make_scheduler(warmup, total)(self.opt)
        for _ in range(step):
            self.opt.step()
            self.lr_scheduler.step()

    def next_lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


def _trainer(budget: float, max_steps: int = 100, every: int = 10, warmup: int = 20, step: int = 0) -> Trainer:
    t = Trainer.__new__(Trainer)  # no process group, model or loader: only the budget arithmetic is under test
    t.cfg = TrainConfig()
    t.cfg.run.time_budget_s, t.cfg.run.max_steps, t.cfg.eval.every = budget, max_steps, every
    t.engine, t.max_steps, t.step = _Engine(max_steps, warmup, step), max_steps, step
    t.step_times, t.eval_times, t.t_start = [], [], time.perf_counter()
    return t


def test_evaluations_counted_between_steps():
    t = _trainer(0, every=10)
    assert t._evals_between(0, 10) == 1 and t._evals_between(0, 25) == 3 and t._evals_between(10, 20) == 1
    assert t._evals_between(12, 13) == 1  # the run's last step always evaluates
    t.cfg.eval.every = 0
    assert t._evals_between(0, 50) == 0


def test_budget_lowers_max_steps_and_the_schedule_end():
    t = _trainer(60.5, max_steps=100, every=10, step=4)
    t.step_times = [5.0, 1.0, 1.0, 1.0]  # the first step (warm-up) does not count
    t.eval_times = [3.0]
    t.fit_budget()
    # 60.5 s - 2 s margin = 58.5 s left: k steps + evaluations (every 10 and at the end, 3 s each) must fit
    k = t.max_steps - 4
    assert k + 3 * t._evals_between(4, t.max_steps) <= 58.5 < (k + 1) + 3 * t._evals_between(4, t.max_steps + 1)
    assert t.max_steps == 47
    f = t.engine.lr_scheduler.lr_lambdas[0]
    assert f.total == 47 and f.warmup == 11  # still warming up: cut to a quarter of the run
    assert t.engine.next_lr() == pytest.approx(5 / 11)  # step 5 follows the moved warm-up at once
    for _ in range(4, 46):
        t.engine.opt.step()
        t.engine.lr_scheduler.step()
    assert t.engine.next_lr() == pytest.approx(1 / 36)  # step 47, the new last: decayed to ~0


def test_budget_never_raises_max_steps_and_shortens_a_long_warmup():
    t = _trainer(1e6, max_steps=30, step=2)
    t.step_times = [1.0, 1.0]
    t.fit_budget()
    assert t.max_steps == 30
    t = _trainer(20.5, max_steps=100, every=0, warmup=30, step=2)
    t.step_times = [1.0, 1.0]
    t.fit_budget()
    assert t.max_steps == 2 + 18 and t.engine.lr_scheduler.lr_lambdas[0].warmup == 20 // 4


def test_no_budget_changes_nothing():
    t = _trainer(0, max_steps=100, step=50)
    t.step_times = [100.0] * 50
    t.fit_budget()
    assert t.max_steps == 100 and t.engine.lr_scheduler.lr_lambdas[0].total == 100
