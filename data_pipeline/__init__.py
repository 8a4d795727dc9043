"""Ray pre-tokenization of E2Rank corpora into WebDataset shards (the shard format, readers, teachers); the trainer
streams them with trainer/loader.py."""
