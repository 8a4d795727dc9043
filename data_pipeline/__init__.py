"""Ray pre-tokenization of E2Rank corpora into WebDataset shards, and the loader the trainer streams them with."""
