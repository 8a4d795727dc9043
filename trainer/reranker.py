"""Deprecated module name, kept until 0.2.0: the Reranker is `evaluation.reranker.Reranker`."""

import warnings

from evaluation.reranker import NotAnExport, Reranker

__all__ = ["NotAnExport", "Reranker"]
warnings.warn("trainer.reranker is now evaluation.reranker (this name goes in 0.2.0)", FutureWarning, stacklevel=2)
