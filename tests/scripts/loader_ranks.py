"""One rank of the multi-process loader test (run under torchrun): iterate, check equal counts over gloo."""

import json
import sys
from datetime import timedelta

import torch.distributed as dist

from trainer.loader import LoaderConfig, ShardLoader

shard_dir, out, same_source = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
cfg = LoaderConfig(batch_size=3, grad_accum=2, num_workers=2, negatives_per_query=2, same_source=same_source, seed=7)
loader = ShardLoader(shard_dir, cfg, rank=rank, world_size=dist.get_world_size())  # from the process group
batches = [{"keys": b["keys"], "sources": b["sources"], "global_source": b["global_source"], "position": b["position"],
            "docs": int(b["doc_input_ids"].shape[0])} for b in loader]
counts = [None] * dist.get_world_size()
dist.all_gather_object(counts, len(batches))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": dist.get_world_size(), "batches": batches, "counts": counts,
               "dropped": loader.dropped_per_epoch, "padding_efficiency": loader.padding_efficiency}, f)
dist.destroy_process_group()
