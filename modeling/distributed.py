"""Everything about process groups in one place: init, rank helpers, the autograd-aware gather."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): the process group's once it exists; the launcher's environment only before."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def env_world_size() -> int:
    """World size the launcher announced (before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """Ranks on this machine (they share its memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world()[1]))


def is_main() -> bool:
    return world()[0] == 0


def init(timeout_s: int) -> str:
    """Initialise through DeepSpeed (it reuses a group that Ray Train or torchrun already made). Returns the backend."""
    import deepspeed

    if os.environ.get("SKIP_DS_SHM_OP") == "1":  # the CPU shm op JIT-builds for ~60 s and only speeds up inference
        from deepspeed import ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "WORLD_SIZE" not in os.environ:  # a plain `python -m trainer`: a world of one on 127.0.0.1
        from common.net import free_port

        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_backend()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0; gradients flow back to the rank that owns each slice
    (all_gather's backward is a reduce-scatter sum). Shapes must match across ranks (the loader guarantees it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def max_across(n: int) -> int:
    """The largest value of a per-rank integer (e.g. a chunk count every rank must then use)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across(x: torch.Tensor) -> torch.Tensor:
    """Global mean of a per-rank scalar, for logging (no gradient)."""
    x = x.detach().float().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def sum_across(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (no gradient); x itself without a process group. Rows that only one rank filled
    (the others hold zeros) come back bit-exact."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone().to(_device())
    dist.all_reduce(x)
    return x.cpu()
