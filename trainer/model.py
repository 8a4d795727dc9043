"""The encoder: a Hugging Face backbone, one pooling function, L2-normalised embeddings.

`pool` is the only pooling implementation; training, evaluation, export checks and the Reranker all call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .packing import is_packed, kernel_name, packed_hidden, pool_packed, register

log = logging.getLogger("e2rank")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[N, L, D] hidden states + [N, L] attention mask -> [N, D] (not normalised).

    last: the hidden state of each sequence's last real token, for left or right padding alike.
    mean: average over real tokens. cls: the first real token."""
    if mode == "last":
        if bool((mask[:, -1] == 1).all()):  # left padding (our loader): the last position, no gather
            return hidden[:, -1]
        idx = mask.long().cumsum(1).argmax(1)  # position of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "cls":
        idx = (mask == 0).long().sum(1) * (mask[:, 0] == 0).long()  # first real token under left padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown pooling {mode!r}")


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.causal = is_causal(backbone)
        self.packed = self.causal and is_packed(backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, input_ids, attention_mask, self.pooling, causal=self.causal)


def is_causal(backbone: nn.Module) -> bool:
    """A decoder whose attention is causal (Llama/Qwen attention modules say so); encoders (BERT) are not."""
    flags = [m.is_causal for m in backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def to_right_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens first (in order), padding after, whatever the padding side was."""
    if bool((mask[:, 0] == 1).all()):
        return ids, mask
    order = torch.argsort(1 - mask.to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so an embedding does not depend on how much padding precedes it
    (HF forwards default to arange(L), which shifts left-padded text; absolute-position encoders would drift)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def embed(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
          causal: bool | None = None) -> torch.Tensor:
    """The one way text becomes an embedding: backbone -> pool -> L2 normalise, in fp32.

    Causal decoders run right-padded with no attention mask: a real token only attends to earlier tokens, all real,
    so its hidden state is exactly the masked one, and attention takes the fused causal kernels (flash on GPU). A
    padding mask would instead force sdpa off flash (mask + GQA: the slow math path on CUDA), and left padding gives
    pad rows with nothing to attend to, whose NaN outputs poison the weight gradients (0 x NaN) on CUDA kernels."""
    if causal is None:
        causal = is_causal(backbone)
    if causal and is_packed(backbone):  # one row, no padding, block-diagonal causal attention (trainer/packing.py)
        hidden, cu = packed_hidden(backbone, input_ids, attention_mask)
        return F.normalize(pool_packed(hidden, cu, pooling).float(), dim=-1)
    if causal:
        input_ids, attention_mask = to_right_padding(input_ids, attention_mask)
        out = backbone(input_ids=input_ids)
    else:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    emb = pool(out.last_hidden_state, attention_mask, pooling)
    return F.normalize(emb.float(), dim=-1)  # similarities and losses in fp32, whatever the model dtype


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    name: str


def native_bf16(cuda: bool) -> bool:
    """Whether this device multiplies bf16 natively: GPUs, and CPUs with AMX or AVX512-BF16. Elsewhere bf16 is
    emulated and slow: on an AVX2-only AMD EPYC, a 1024^3 bf16 matmul ran at 0.9 GFLOP/s vs 57 in fp32 (1 thread),
    and a SmolLM2 forward + backward 10x slower than fp32."""
    if cuda:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(cfg: ModelConfig, cuda: bool) -> Precision:
    """auto = bf16 where the hardware multiplies it natively (GPU; CPUs with AMX/AVX512-BF16, where a SmolLM2-135M
    step ran 2x faster than fp32), else fp32. Similarities and losses are fp32 either way (embed)."""
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and not native_bf16(cuda)):
        return Precision(torch.float32, "fp32")
    if cfg.dtype == "bf16" and not native_bf16(cuda):
        log.warning("[model] bf16 requested on a CPU without native bf16 (no AMX/AVX512-BF16): expect it to run many "
                    "times slower than fp32; model.dtype=auto picks fp32 here")
    return Precision(torch.bfloat16, "bf16")


def attention_candidates(cfg: ModelConfig, cuda: bool) -> list[str]:
    if cfg.attn_implementation != "auto":
        return [cfg.attn_implementation]
    order = ["sdpa", "eager"]
    if cuda:
        try:
            import flash_attn  # noqa: F401

            order.insert(0, "flash_attention_2")
        except ImportError:
            pass
    return order


def apply_liger(path: str, cuda: bool) -> str:
    """liger-kernel's Triton kernels for this model family (patched into transformers' classes); says what ran."""
    import json
    from pathlib import Path

    kind = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    try:
        import liger_kernel.transformers as lk
    except ImportError:
        log.warning("[model] model.liger=true but liger-kernel is not installed: unfused layers")
        return "liger-kernel not installed"
    fn = {"qwen3": getattr(lk, "apply_liger_kernel_to_qwen3", None), "llama": lk.apply_liger_kernel_to_llama}.get(kind)
    if not cuda or fn is None:
        log.warning("[model] model.liger=true needs CUDA and a Qwen3 or Llama model (%s): unfused layers", kind)
        return "liger-kernel not applied"
    # an embedding model has no LM head: the fused linear cross-entropy does not apply
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    return f"liger-kernel ({kind}: RoPE, RMSNorm, SwiGLU)"


def compile_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer (the repeated block; the embedding lookup and pooling stay eager)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model.compile: {type(model).__name__} has no decoder `layers` to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def wants_packing(cfg: ModelConfig, cuda: bool) -> bool:
    """auto: packed on GPUs (no padding, fewer and larger forwards); on CPUs the length-grouped chunks, which
    measured faster there (bench/README.md)."""
    return cfg.packing == "on" or (cfg.packing == "auto" and cuda)


def load_backbone(path: str, cfg: ModelConfig, dtype: torch.dtype, cuda: bool) -> tuple[nn.Module, str]:
    """AutoModel with the best attention backend that loads; returns (model, backend). Says which it took. A causal
    decoder with packing on gets the packed attention (encoders keep their masked path)."""
    from transformers import AutoModel

    errors = []
    fused = apply_liger(path, cuda) if cfg.liger else ""  # patches the model classes: before the model is built
    for impl in attention_candidates(cfg, cuda):
        try:
            model = AutoModel.from_pretrained(path, attn_implementation=impl, dtype=dtype)
            if wants_packing(cfg, cuda) and is_causal(model):
                model.set_attn_implementation(register())
                impl = f"{register()} ({kernel_name('cuda' if cuda else 'cpu', dtype)}; unpacked: {impl})"
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.compile:
                impl += f"; {compile_layers(model)} decoder layers compiled"
            return model, impl + (f"; {fused}" if fused else "")
        except (ImportError, ValueError) as e:
            errors.append(f"{impl}: {e}")
            if cfg.attn_implementation != "auto":
                raise
    raise RuntimeError("no attention backend loaded: " + "; ".join(errors))
