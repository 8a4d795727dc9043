"""The trainer with one micro-batch's loss poisoned: POISON_AT (1-based micro-batch count), POISON_HOW (nan | zero),
POISON_RANKS (comma-separated ranks). `zero` is the reference: a finite loss contributing no gradient."""

import os
import sys

import trainer.loop as L
from trainer.__main__ import main

orig, calls = L.compute, {"n": 0}
at, how = int(os.environ["POISON_AT"]), os.environ["POISON_HOW"]
ranks = {int(r) for r in os.environ["POISON_RANKS"].split(",")}


def compute(*args, **kw):
    terms = orig(*args, **kw)
    calls["n"] += 1
    if calls["n"] == at and int(os.environ.get("RANK", 0)) in ranks:
        terms["loss"] = terms["loss"] * (float("nan") if how == "nan" else 0.0)
    return terms


L.compute = compute
sys.exit(main(sys.argv[1:]))
