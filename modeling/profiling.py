"""Where a training step's time goes, by phase: the one classifier of torch.profiler events, used by the trainer's
`run.profile_step` and by the peer benchmark (bench/step_profile.py), so our step and a peer's are cut the same way.

A step marks its phases with `phase("forward")`, `phase("backward")`, ... (torch.profiler.record_function ranges named
`phase/<name>`). Each profiled operator's self time goes to the innermost phase around it, except communication
(gloo/NCCL collectives) and copies (copy_, cat, index_select, ...), which get rows of their own per phase: forward
communication is ZeRO-3's parameter gathers, backward communication is gradient reduction."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch.profiler import record_function

PREFIX = "phase/"
COMM = re.compile(r"gloo|nccl|c10d|all_gather|allgather|reduce_scatter|all_reduce|allreduce|broadcast|_coalesced|"
                  r"wait_tensor|record_param_comms", re.I)
COPIES = {"aten::copy_", "aten::cat", "aten::index_select", "aten::clone", "aten::_to_copy", "aten::contiguous",
          "aten::gather", "aten::index", "aten::index_put_", "aten::narrow_copy", "aten::stack", "aten::fill_",
          "aten::zero_", "aten::zeros", "aten::empty_like", "aten::new_zeros", "aten::flatten_dense_tensors",
          "aten::unflatten_dense_tensors", "aten::split_with_sizes_copy"}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of the step (free when no profiler is recording)."""
    with record_function(PREFIX + name):
        yield


def _phase_of(ev) -> str | None:
    p = ev
    while p is not None:
        if p.name.startswith(PREFIX):
            return p.name[len(PREFIX):]
        p = p.cpu_parent
    return None


def phase_seconds(prof) -> dict[str, float]:
    """{row: seconds of CPU time} from a finished profiler, rows `<phase>` (compute), `<phase>.communication` and
    `<phase>.copies` and `<phase>.python` (time between operators); `unmarked` is operator time outside any phase.
    Self times only, so nothing counts twice."""
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.self_cpu_time_total <= 0:
            continue
        ph = _phase_of(ev) or "unmarked"
        if ev.name.startswith(PREFIX):  # the range's own time: Python and framework code between operators
            kind = ".python"
        else:
            kind = ".communication" if COMM.search(ev.name) else ".copies" if ev.name in COPIES else ""
        out[ph + kind] = out.get(ph + kind, 0.0) + ev.self_cpu_time_total / 1e6
    return dict(sorted(out.items()))


def top_operators(prof, n: int = 25) -> str:
    ka = prof.key_averages()
    return ka.table(sort_by="self_cpu_time_total", row_limit=n)
