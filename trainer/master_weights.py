"""AdamW with fp32 master weights for a bf16 model under ZeRO-0: one flat gradient all-reduce and one fused AdamW.

Under ZeRO-0 with `bf16` enabled DeepSpeed wraps the optimizer in its BF16_Optimizer, which accumulates every
gradient into fp32 buffers through per-parameter hooks and all-reduces them in fp32; under ZeRO-2 each gradient is
copied into buckets that are reduced to their owner rank, then the owner's partition is converted, clipped, stepped and
all-gathered. On 2 gloo ranks of a 2-core CPU (SmolLM2-135M, bf16) either costs ~1.5 s a step more than the model's
own backward (bench/README.md). Here, with nothing partitioned, the step is what mixed-precision data parallelism
needs (Micikevicius et al. 2018, "Mixed Precision Training"; torch DDP's flat buckets):

1. the bf16 gradients are copied into one persistent flat buffer (in the communication dtype) and all-reduced once;
2. that sum becomes the flat fp32 gradient of the fp32 master weights, averaged and clipped in one multiply;
3. torch's fused AdamW steps the masters (one kernel over all tensors) and they are copied back into the bf16 weights.

The optimizer owns the reduction (DeepSpeed's own is switched off: `engine.enable_backward_allreduce = False`), so
several backwards of one step (accumulation, GradCache) are reduced once. A non-finite norm skips the step on every
rank (`overflow`, which DeepSpeed's engine counts as a skipped step). Its state dict holds the masters as
`fp32_groups`, where trainer/checkpoint.py's ZeRO-0 export reads fp32 weights.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class MasterAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float, max_norm: float = 0.0,
                 comm_dtype: torch.dtype | None = None):
        params = [p for p in params if p.requires_grad]
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        n = sum(p.numel() for p in params)
        device = params[0].device
        self.max_norm = max_norm
        self.flat = torch.empty(n, dtype=torch.float32, device=device)  # the masters
        self.flat_grad = torch.zeros(n, dtype=torch.float32, device=device)
        # gradients are summed in the communication dtype: the weights' (as DeepSpeed reduces bf16 gradients) unless set
        self.comm_dtype = comm_dtype or params[0].dtype
        self.flat_comm = self.flat_grad if self.comm_dtype == torch.float32 else \
            torch.empty(n, dtype=self.comm_dtype, device=device)
        self.masters, self.comm_views, off = [], [], 0
        for p in params:
            m = self.flat[off:off + p.numel()].view_as(p)
            m.copy_(p.detach())
            m.grad = self.flat_grad[off:off + p.numel()].view_as(p)
            self.masters.append(m)
            self.comm_views.append(self.flat_comm[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.inner = torch.optim.AdamW(self.masters, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                       fused=True)
        self._global_grad_norm: torch.Tensor | None = None
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        have = [(v, p.grad) for v, p in zip(self.comm_views, params) if p.grad is not None]
        if have:
            torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
        for v, p in zip(self.comm_views, params):
            if p.grad is None:  # unused this step (every rank agrees on the sum; a missing gradient is zeros)
                v.zero_()
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(self.flat_comm)
        if self.flat_comm is not self.flat_grad:
            self.flat_grad.copy_(self.flat_comm)
        norm = torch.linalg.vector_norm(self.flat_grad) / world  # of the averaged gradient
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm.item())
        if self.overflow:
            return
        scale = 1.0 / world
        if self.max_norm > 0:
            scale = scale * torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        self.flat_grad.mul_(scale)
        inner = self.inner.param_groups[0]
        inner["lr"] = self.param_groups[0]["lr"]  # the LR scheduler sets ours
        self.inner.step()
        torch._foreach_copy_(params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "fp32_groups": [self.masters],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    @torch.no_grad()
    def load_state_dict(self, state):
        masters = state["fp32_groups"][0]
        if len(masters) != len(self.masters) or any(a.shape != b.shape for a, b in zip(masters, self.masters)):
            raise RuntimeError(f"optimizer state holds {len(masters)} master weights that do not match this model's "
                               f"{len(self.masters)} trainable parameters")
        torch._foreach_copy_(self.masters, [m.to(self.flat.device) for m in masters])
        self.inner.load_state_dict(state["inner"])
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update(saved)
        torch._foreach_copy_(self.param_groups[0]["params"], self.masters)
