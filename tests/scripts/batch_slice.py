"""One rank's slice of a global batch (queries, and their groups of docs_per_query candidates): what each rank of
the gradient-equivalence test trains on, and what its single-process reference scores half by half."""

import torch


def local_slice(batch: dict, rank: int, world: int) -> dict:
    b = batch["query_input_ids"].shape[0] // world
    g = batch["docs_per_query"]
    out = {"docs_per_query": g}
    for k, v in batch.items():
        if k in ("doc_input_ids", "doc_attention_mask", "doc_hash"):
            out[k] = v[rank * b * g : (rank + 1) * b * g]
        elif torch.is_tensor(v):
            out[k] = v[rank * b : (rank + 1) * b]
    return out
