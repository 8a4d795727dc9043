"""Evaluation and inference for E2Rank models: readers for BEIR folders, TREC runs and qrels and RankGPT slates
(`readers`), trec_eval metrics and paired tests (`metrics`), the two scoring modes (`scoring`), the `Reranker` an
export or a base model is used through (`reranker`), the record of an evaluation in MLflow and the model card
(`tracking`), and the command line (`python -m evaluation`, `cli`)."""
