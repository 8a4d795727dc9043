"""The LR schedule: linear warm-up, then linear decay to 0 at the run's last step.

Owned here, not by DeepSpeed's `WarmupDecayLR`: that scheduler starts at iteration -1 and the engine steps it after
each optimizer step, so its first two steps ran at `warmup_min_lr` (0) and, with no warm-up, it never decayed.
Here optimizer step k (1-based) uses `peak * factor(k - 1)`: a torch `LambdaLR` evaluates its lambda at the number
of steps already taken, and DeepSpeed steps it once per optimizer step (`deepspeed.initialize(lr_scheduler=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupLinearDecay:
    """factor(done) for the step after `done` optimizer steps. A callable object, not a lambda, so LambdaLR's
    state_dict carries `warmup` and `total` into checkpoints (a run whose end time_budget_s moved resumes on
    the moved schedule)."""

    warmup: int
    total: int

    def __call__(self, done: int) -> float:
        if done < self.warmup:
            return (done + 1) / self.warmup  # step 1 already learns; step `warmup` is at the peak
        return max(0.0, (self.total - done) / max(self.total - self.warmup, 1))  # the last step: 1/(total - warmup)

    def lrs(self, peak: float) -> list[float]:
        """The LR of every optimizer step 1..total (for logs and tests)."""
        return [peak * self(k) for k in range(self.total)]


def make_scheduler(warmup: int, total: int):
    """What deepspeed.initialize takes as lr_scheduler: a callable building the scheduler on its optimizer."""
    return lambda opt: LambdaLR(opt, WarmupLinearDecay(warmup, total))


def retarget(sched: LambdaLR | None, total: int) -> None:
    """Move the schedule's end to `total` steps (run.time_budget_s, or a resumed run's saved max_steps). A warm-up
    still running and longer than a quarter of the new run is cut to that quarter, or it would eat the run."""
    if sched is None:
        return
    f, done = sched.lr_lambdas[0], sched.last_epoch  # last_epoch: optimizer steps taken
    f.total = total
    if f.warmup > max(total // 4, 1) and done < f.warmup:
        f.warmup = max(total // 4, 1)
    # the LR of the next step follows the moved schedule now, not one step late
    for g, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        g["lr"] = base * f(done)
