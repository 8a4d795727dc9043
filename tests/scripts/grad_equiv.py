"""One rank of the gradient-equivalence test: its slice of a fixed global batch, under DeepSpeed ZeRO-N."""

import sys

import deepspeed
import torch
from batch_slice import local_slice  # this folder (sys.path[0] of a script)
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModel

from modeling import distributed as D
from modeling.embedding import Encoder
from modeling.packing import register
from trainer.config import LossConfig, TrainConfig
from trainer.grad_cache import CachedStep
from trainer.objective import compute
from trainer.zero import client_optimizer, ds_config, make_optimizer, master_weights, reduce_once

model_path, batch_path, stage, zero, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# padded | chunked | cached | packed | packed-cached | persist (chunked, every ZeRO-3 tensor persistent)
# | local | local-cached (loss.negatives_cross_device=false: each rank scores its own candidates only)
mode = sys.argv[6] if len(sys.argv) > 6 else "padded"
LOSS = LossConfig(negatives_cross_device=not mode.startswith("local"))
bf16 = len(sys.argv) > 7 and sys.argv[7] == "bf16"  # the model and DeepSpeed in bf16, as model.dtype=bf16 trains
CHUNK = 16  # tokens per forward: 1-2 sequences, so the ranks' chunk counts differ and must be agreed


D.init(60)
rank, world = D.world()
batch = local_slice(torch.load(batch_path), rank, world)
backbone = AutoModel.from_pretrained(
    model_path, attn_implementation="sdpa", dtype=torch.bfloat16 if bf16 else torch.float32
)
if "packed" in mode:  # one unpadded row per chunk, block-diagonal causal attention (modeling/packing.py)
    backbone.set_attn_implementation(register())
enc = Encoder(backbone, "last")
assert enc.packed == ("packed" in mode)
# the trainer's own DeepSpeed config (trainer.zero.ds_config), so the equivalence covers what training runs
tc = TrainConfig()
tc.loader.batch_size, tc.loader.grad_accum, tc.deepspeed.zero_stage = batch["query_input_ids"].shape[0], 1, zero
tc.optim.lr, tc.optim.grad_clip = 0.0, 0.0
# persist: every tensor whole on every rank (what auto persistence picks when the model fits); else partition all
tc.deepspeed.stage3_param_persistence_threshold = 10**9 if "persist" in mode else 0
cfg = ds_config(tc, bf16=bf16, hidden=enc.backbone.config.hidden_size)
params = list(enc.parameters())
master = master_weights(tc, zero, bf16)  # ZeRO-0 in bf16: the trainer's MasterAdamW reduces in its step
engine, *_ = deepspeed.initialize(
    model=enc,
    model_parameters=params,
    config=cfg,
    optimizer=make_optimizer(tc, params, master) if client_optimizer(tc) else None,
)
engine.enable_backward_allreduce = not master
if mode.endswith("cached"):
    step = CachedStep(engine, CHUNK)
    terms = step.forward(batch, stage, LOSS)

    def backward(surrogate, last):
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(surrogate)

    with reduce_once(engine, 2):  # the trainer's: one gradient reduction for all chunk backwards
        step.backward(backward)
else:
    terms = compute(engine, batch, stage, LOSS, chunk_tokens=0 if mode in ("padded", "local") else CHUNK)
    engine.backward(terms["loss"])
if master:  # the averaged fp32 gradients the masters are stepped with (lr 0, no clipping)
    engine.step()
    grads = {n: m.grad.clone() for (n, _), m in zip(engine.module.named_parameters(), engine.optimizer.masters)}
else:
    grads = {n: safe_get_full_grad(p).detach().float().clone() for n, p in engine.module.named_parameters()}
loss = D.mean_across(terms["loss"])
if rank == 0:
    torch.save({"grads": grads, "loss": loss}, out)
# a clean teardown: a process group left to interpreter exit once aborted a rank ("terminate called without an
# active exception", exit -6) after its work was done
D.barrier()
torch.distributed.destroy_process_group()
