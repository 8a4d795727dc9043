"""run.time_budget_s: the run ends at the largest step whose remaining steps, dev evaluations and final save and
export fit in the budget, re-planned after every step from the times measured so far."""

from __future__ import annotations

import time

from modeling import distributed as D


def evals_between(every: int, a: int, b: int) -> int:
    """Dev evaluations after steps a+1..b when the run ends at b (every N steps, and at the end)."""
    return 0 if not every else b // every - a // every + (b % every != 0)


class TimeBudget:
    def __init__(self, budget_s: float, eval_every: int, t_start: float):
        self.budget_s, self.eval_every, self.t_start = budget_s, eval_every, t_start
        self.step_times: list[float] = []
        self.eval_times: list[float] = []

    def record_step(self, seconds: float) -> None:
        self.step_times.append(seconds)

    def record_eval(self, seconds: float) -> None:
        self.eval_times.append(seconds)

    def should_refit(self) -> bool:
        return bool(self.budget_s) and len(self.step_times) >= 2

    def fit(self, step: int, max_steps: int) -> tuple[int, str] | None:
        """The new last step and why, when the budget needs one below max_steps: the remaining steps (median step
        time; the first step warms kernels up and is left out), evaluations (mean so far) and the final save and
        export (one step's time, twice over, as a margin). The slowest rank decides, so every rank stops alike."""
        if not self.should_refit():
            return None
        times = sorted(self.step_times[1:])
        step_t = times[len(times) // 2]
        eval_t = sum(self.eval_times) / len(self.eval_times) if self.eval_times else 0.0
        left = self.budget_s - (time.perf_counter() - self.t_start) - 2 * step_t
        fit = step
        while (
            fit < max_steps
            and (fit + 1 - step) * step_t + evals_between(self.eval_every, step, fit + 1) * eval_t <= left
        ):
            fit += 1
        fit = -D.max_across(-max(fit, step + 1))
        if fit >= max_steps:
            return None
        return fit, f"run.time_budget_s={self.budget_s:.0f}: {step_t:.2f}s/step, {eval_t:.1f}s/evaluation"
