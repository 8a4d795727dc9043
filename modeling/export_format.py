"""The file an E2Rank export carries beside the Hugging Face weights and tokenizer: how to tokenize, pool and prompt
(written by trainer/checkpoint.py, read by the Reranker and the sentence-transformers export)."""

EXPORT_INFO = "e2rank.json"
