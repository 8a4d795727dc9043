"""How glibc serves the CPU allocations of a training step or an evaluation (set once per process, before work)."""

from __future__ import annotations

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)

# For the processes that start Ray workers (common/ray_head.py, launch/stage1.py's local Ray): Ray Train runs the
# training function in a thread other than the worker's main one, and glibc gives such a thread an arena of its own,
# built from 64 MB heaps that it unmaps once they empty, so `reuse` below does not hold there and activations are
# faulted in again every step. One arena keeps them. Measured on a 2-core AMX Xeon, the main job's stage-1 config
# (SmolLM2, 2 workers x 1 thread, 9 steps each): a median 7.9 s a step under Ray Train, 7.0 s with
# MALLOC_ARENA_MAX=1, 6.4 s under torchrun (whose ranks train in their main thread). glibc reads it at process
# start only, so it travels in the environment; a value already set wins.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def set_cpu_allocator(mode: str) -> bool:
    """How glibc serves a CPU training step's activations (they are allocated and freed every step):

    - `reuse`: blocks under 64 MB come from the heap and freed memory stays in the process (fixed mmap and trim
      thresholds), so the next step reuses it without page faults, as a GPU caching allocator does;
    - `release`: blocks of 4 MB and more are mmap'd and returned to the OS on free. Lowest RSS (a SmolLM2-135M forward
      + backward of 16 x 512 tokens with checkpointing peaked at 2.46 GB instead of 4.56), but every step faults its
      activations in afresh: a forward of 20 x 128 tokens took 9.8 s instead of 4.7 s, half of it kernel time;
    - `default`: glibc's dynamic thresholds (they rise as large blocks are freed; RSS then grows step after step).
    Fixed thresholds also turn glibc's dynamic adjustment off. Returns whether it was applied (glibc only)."""
    if mode == "default":
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        if mode == "release":
            return bool(libc.mallopt(M_MMAP_THRESHOLD, 4 << 20))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
