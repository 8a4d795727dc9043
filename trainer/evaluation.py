"""Deprecated module name, kept until 0.2.0: evaluation.readers, evaluation.metrics and evaluation.scoring."""

import warnings

from evaluation.metrics import METRICS, metrics, paired_test, per_query, per_query_of_run, relevance_threshold, run_file
from evaluation.readers import (
           EvalSet,
           load_beir,
           load_eval_set,
           load_rankgpt,
           read_qrels,
           read_trec_run,
           write_trec_run,
)
from evaluation.scoring import evaluate, first_stage_scores

__all__ = ["METRICS", "EvalSet", "evaluate", "first_stage_scores", "load_beir", "load_eval_set", "load_rankgpt",
           "metrics", "paired_test", "per_query", "per_query_of_run", "read_qrels", "read_trec_run",
           "relevance_threshold", "run_file", "write_trec_run"]
warnings.warn("trainer.evaluation is now evaluation.readers / .metrics / .scoring (this name goes in 0.2.0)",
              FutureWarning, stacklevel=2)
