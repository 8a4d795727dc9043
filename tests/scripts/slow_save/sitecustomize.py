"""Fault injection for tests/trainer/test_checkpoint.py, on PYTHONPATH only there: with E2RANK_TEST_SLOW_SAVE=<seconds>,
every torch.save into a checkpoint being written (`*.partial`) and its final rename wait that long first, so a test
can SIGKILL the job at a chosen point inside a save. Nothing else changes."""

import os

_delay = float(os.environ.get("E2RANK_TEST_SLOW_SAVE") or 0)
if _delay:
    import pathlib
    import time

    import torch

    _save, _replace = torch.save, pathlib.Path.replace

    def _slow_save(obj, f, *a, **k):
        if ".partial" in str(f):
            time.sleep(_delay)
        return _save(obj, f, *a, **k)

    def _slow_replace(self, target):
        if self.name.endswith(".partial"):
            time.sleep(_delay)
        return _replace(self, target)

    torch.save, pathlib.Path.replace = _slow_save, _slow_replace
