"""Stopping what we started, by process group: never `pkill`, `killall` or `ray stop` (they hit other users' work)."""

from __future__ import annotations

import os
import signal
import subprocess


def groups_of_tree(pid: int) -> set[int]:
    """Process groups of pid and all its descendants: torchrun starts each worker in a session of its own, so
    killing the launcher's group alone would orphan the ranks."""
    import psutil

    groups = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return groups
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    return groups


def kill_tree(proc: subprocess.Popen, grace: float = 5.0, term: bool = True) -> None:
    """SIGTERM the groups of proc's tree, wait `grace`, then SIGKILL them; term=False: SIGKILL at once, as a crash
    would."""
    groups = groups_of_tree(proc.pid) | {proc.pid}
    for sig in (signal.SIGTERM, signal.SIGKILL) if term else (signal.SIGKILL,):
        if sig == signal.SIGKILL:
            groups |= groups_of_tree(proc.pid)
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGTERM and grace:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    proc.wait(timeout=30)
