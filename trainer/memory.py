"""A per-rank memory estimate printed at start-up, and a refusal (naming the setting to change) when it cannot fit.

Model states follow ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054): weights in the training dtype, fp32 master
weights and two Adam moments (12 bytes/parameter), gradients; ZeRO-1 partitions the optimizer states, ZeRO-2 also the
gradients, ZeRO-3 also the weights (plus the layers gathered live during a forward). Activations follow Korthikanti et
al. 2022 (arXiv 2205.05198): about 34 x hidden bytes-per-element per token per layer without recomputation; with
gradient checkpointing, one hidden state per layer plus one layer's full activations.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 2**30
RUNTIME_GB = 1.0  # torch + deepspeed + transformers imported, allocator slack (measured ~0.5-0.6 GB idle on CPU)


@dataclass
class Estimate:
    weights: float
    optimizer: float
    grads: float
    activations: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.grads + self.activations + self.runtime

    def describe(self) -> str:
        return (
            f"{self.total / GB:.1f} GB (weights {self.weights / GB:.2f}, optimizer {self.optimizer / GB:.2f}, "
            f"grads {self.grads / GB:.2f}, activations {self.activations / GB:.2f}, runtime {self.runtime / GB:.1f})"
        )


def estimate(
    *,
    params: int,
    hidden: int,
    layers: int,
    bytes_per: int,
    world: int,
    zero_stage: int,
    graph_tokens: int,
    grad_ckpt: bool,
    offload_optimizer: bool = False,
    persistent: bool = False,
) -> Estimate:
    """graph_tokens: padded tokens whose activations are alive at once (a micro-batch, or one GradCache chunk);
    persistent: ZeRO-3 keeps every weight whole on every rank (trainer/zero.py)."""
    w_all = params * bytes_per
    opt = 0.0 if offload_optimizer else params * 12 / (world if zero_stage >= 1 else 1)
    grads = params * bytes_per / (world if zero_stage >= 2 else 1)
    if zero_stage == 3 and not persistent:
        weights = w_all / world + 2 * w_all / max(layers, 1)  # own partition + ~2 gathered layers (prefetch)
    else:
        weights = w_all
    per_tok_layer = 34 * hidden * bytes_per
    if grad_ckpt:
        act = graph_tokens * (layers * hidden * bytes_per + per_tok_layer)
    else:
        act = graph_tokens * layers * per_tok_layer
    return Estimate(weights, opt, grads, act, RUNTIME_GB * GB)


def available_bytes(device) -> float:
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


def advice(est: Estimate, grad_ckpt: bool, grad_cache: bool) -> str:
    tips = []
    if est.activations > 0.3 * est.total:
        if not grad_ckpt:
            tips.append("model.gradient_checkpointing=true")
        if not grad_cache:
            tips.append("encode.grad_cache=true (memory ~ one encode.chunk_tokens chunk)")
        else:
            tips.append("a smaller encode.chunk_tokens")
        tips.append("a smaller loader.batch_size (with loader.grad_accum to keep the global batch)")
    if est.optimizer > 0.3 * est.total:
        tips.append("deepspeed.offload_optimizer=true or more ranks")
    return "; ".join(tips) or (
        "a smaller loader.batch_size (with loader.grad_accum to keep the global batch), or more memory per rank"
    )
