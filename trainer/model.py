"""Loading the backbone for training: precision, attention backend, packing, compiled or fused layers. How it then
embeds text (pooling, normalisation) is modeling/embedding.py, shared with evaluation and export."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from modeling import cpu_attention
from modeling.embedding import is_causal, native_bf16
from modeling.packing import kernel_name, register

from .config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # of the weights
    name: str  # fp32, bf16, or bf16-autocast (fp32 weights, bf16 matmuls)

    @property
    def compute(self) -> torch.dtype:
        return torch.float32 if self.name == "fp32" else torch.bfloat16


def resolve_precision(cfg: ModelConfig, cuda: bool) -> Precision:
    """auto = bf16 where the hardware multiplies it natively (GPU; CPUs with AMX/AVX512-BF16, where a SmolLM2-135M
    step ran 2x faster than fp32), else fp32. Similarities and losses are fp32 either way (embed)."""
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and not native_bf16(cuda)):
        return Precision(torch.float32, "fp32")
    if cfg.dtype == "bf16" and not native_bf16(cuda):
        log.warning("[model] bf16 requested on a CPU without native bf16 (no AMX/AVX512-BF16): expect it to run many "
                    "times slower than fp32; model.dtype=auto picks fp32 here")
    if cfg.autocast:
        return Precision(torch.float32, "bf16-autocast")
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
    measured faster there (the main job's stage-1 steps: 5.45-5.77 s against 6.50-6.81 s packed, bench/README.md)."""
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
            if not cuda and is_causal(model):  # read by the sdpa and packed attentions (0 included: never)
                cpu_attention.set_max_len(model, cfg.fp32_attention_max_len)
            fp32_short = not cuda and dtype == torch.bfloat16 and cfg.fp32_attention_max_len > 0 and is_causal(model)
            if wants_packing(cfg, cuda) and is_causal(model):
                model.set_attn_implementation(register())
                impl = f"{register()} ({kernel_name('cuda' if cuda else 'cpu', dtype)}; unpacked: {impl})"
            elif fp32_short and impl == "sdpa":
                model.set_attn_implementation(cpu_attention.register())
                impl = cpu_attention.NAME
            if fp32_short and impl != "eager":
                impl += f" (training: fp32 attention up to {cfg.fp32_attention_max_len} tokens)"
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
