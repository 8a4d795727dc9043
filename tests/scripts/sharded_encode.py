"""One rank of the sharded-evaluation test: every rank encodes the same texts through a ZeRO-N engine with
Reranker(shard=(rank, world)), as the trainer's dev evaluation does; rank r saves what it got back."""

import json
import sys

import deepspeed
import torch
from transformers import AutoModel

from common.pretrained import load_tokenizer
from data_pipeline.text import TextEncoder, TokenizationConfig
from evaluation.reranker import Reranker
from modeling import distributed as D
from modeling.embedding import Encoder
from trainer.config import TrainConfig
from trainer.zero import ds_config

model_path, texts_path, zero, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
D.init(60)
rank, world = D.world()
enc = Encoder(AutoModel.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32), "last")
tc = TrainConfig()
tc.deepspeed.zero_stage = zero
tc.deepspeed.stage3_param_persistence_threshold = 0  # every tensor partitioned: each forward is a collective
tc.optim.fused = False  # DeepSpeed builds the optimizer from its JSON (no client optimizer to pass here)
engine, *_ = deepspeed.initialize(model=enc, model_parameters=enc.parameters(),
                                  config=ds_config(tc, bf16=False, hidden=enc.backbone.config.hidden_size))
engine.eval()
text = TextEncoder(load_tokenizer(model_path), TokenizationConfig(tokenizer=model_path, doc_max_len=64))
rer = Reranker(None, text, "last", batch_size=2, chunk_tokens=48, encode=lambda ids, mask: engine(ids, mask),
               shard=(rank, world))
texts = json.loads(open(texts_path).read())
with torch.no_grad():
    emb = rer.embed(texts)
torch.save({"emb": torch.from_numpy(emb), "forward_calls": rer.forward_calls}, f"{out}.rank{rank}")
D.barrier()
torch.distributed.destroy_process_group()
