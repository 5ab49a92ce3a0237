"""A numpy reader of CTranslate2 `model.bin` files that fills a transformers `WhisperEncoder`.

The offline Whisper packages (offline-assets.md) ship CTranslate2 models only. Format (binary version
6, CTranslate2's `ModelSpec.save`): u32 version, str spec name, u32 revision, u32 n_variables, then per
variable: str name, u8 rank, u32 dims..., u8 dtype id, u32 n_bytes, raw bytes; then u32 n_aliases and
(alias, target) string pairs. Strings are u16 length (incl. NUL) + bytes + NUL.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:  # the reader and `whisper_dims` need numpy only
    import torch

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class CT2FormatError(ValueError):
    pass


def _u(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise CT2FormatError("truncated model.bin")
    return struct.unpack("<" + fmt, raw)[0]


def _s(f: BinaryIO) -> str:
    n = _u(f, "H")
    return f.read(n)[:-1].decode("utf-8")


def read_ct2(path: str, prefixes: Iterable[str] | None = None, load: bool = True) -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 model.bin as numpy arrays (float32 for floats).

    `prefixes` keeps only variables whose names start with one of them (skip the decoder);
    `load=False` returns empty arrays of the right shape (header scan, for metadata).
    """
    keep = tuple(prefixes) if prefixes is not None else None
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        version = _u(f, "I")
        if version < 5:
            raise CT2FormatError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
        _s(f)  # spec name (WhisperSpec)
        _u(f, "I")  # spec revision
        for _ in range(_u(f, "I")):
            name = _s(f)
            shape = tuple(_u(f, "I") for _ in range(_u(f, "B")))
            dtype_id = _u(f, "B")
            n_bytes = _u(f, "I")
            if keep is not None and not name.startswith(keep):
                f.seek(n_bytes, os.SEEK_CUR)
                continue
            dt = _DTYPES.get(dtype_id)
            if dt is None:
                raise CT2FormatError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
            if not load:
                f.seek(n_bytes, os.SEEK_CUR)
                out[name] = np.empty(shape, dtype=np.float32 if dt == "bfloat16" else dt)
                continue
            raw = f.read(n_bytes)
            if dt == "bfloat16":  # numpy has no bf16: widen the 16 bits into float32's high half
                arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=dt)
            arr = arr.reshape(shape)
            out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()
        for _ in range(_u(f, "I")):
            alias, target = _s(f), _s(f)
            if target in out:
                out[alias] = out[target]
    return out


def whisper_dims(variables: dict[str, np.ndarray]) -> dict[str, int]:
    blocks = {k.split("/")[1] for k in variables if k.startswith("encoder/layer_")}
    n_layers = 1 + max(int(b[len("layer_"):]) for b in blocks if b[len("layer_"):].isdigit())
    d_model = variables["encoder/conv1/weight"].shape[0]
    heads = variables.get("encoder/num_heads")
    return {
        "d_model": int(d_model),
        "encoder_layers": int(n_layers),
        "encoder_attention_heads": int(heads.reshape(-1)[0]) if heads is not None and heads.size else max(1, d_model // 64),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
    }


def whisper_encoder_from_ct2(model_bin: str) -> torch.nn.Module:
    """A transformers `WhisperEncoder` (float32, eval) holding the weights of a CTranslate2 Whisper model."""
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    v = read_ct2(model_bin, prefixes=("encoder/",))
    dims = whisper_dims(v)
    cfg = WhisperConfig(
        d_model=dims["d_model"], encoder_layers=dims["encoder_layers"],
        encoder_attention_heads=dims["encoder_attention_heads"], encoder_ffn_dim=dims["encoder_ffn_dim"],
        num_mel_bins=dims["num_mel_bins"], max_source_positions=dims["max_source_positions"],
        decoder_layers=1, decoder_attention_heads=dims["encoder_attention_heads"], decoder_ffn_dim=8,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    enc = WhisperEncoder(cfg)
    d = dims["d_model"]

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(v[name], dtype=np.float32))

    state: dict[str, torch.Tensor] = {
        "conv1.weight": t("encoder/conv1/weight"), "conv1.bias": t("encoder/conv1/bias"),
        "conv2.weight": t("encoder/conv2/weight"), "conv2.bias": t("encoder/conv2/bias"),
        "embed_positions.weight": t("encoder/position_encodings/encodings"),
        "layer_norm.weight": t("encoder/layer_norm/gamma"), "layer_norm.bias": t("encoder/layer_norm/beta"),
    }
    for i in range(dims["encoder_layers"]):
        p, q = f"encoder/layer_{i}", f"layers.{i}"
        # CTranslate2 fuses q, k, v into one projection (k has no bias in Whisper: CT2 stores zeros).
        qkv_w, qkv_b = t(f"{p}/self_attention/linear_0/weight"), t(f"{p}/self_attention/linear_0/bias")
        state.update({
            f"{q}.self_attn.q_proj.weight": qkv_w[:d], f"{q}.self_attn.q_proj.bias": qkv_b[:d],
            f"{q}.self_attn.k_proj.weight": qkv_w[d : 2 * d],
            f"{q}.self_attn.v_proj.weight": qkv_w[2 * d :], f"{q}.self_attn.v_proj.bias": qkv_b[2 * d :],
            f"{q}.self_attn.out_proj.weight": t(f"{p}/self_attention/linear_1/weight"),
            f"{q}.self_attn.out_proj.bias": t(f"{p}/self_attention/linear_1/bias"),
            f"{q}.self_attn_layer_norm.weight": t(f"{p}/self_attention/layer_norm/gamma"),
            f"{q}.self_attn_layer_norm.bias": t(f"{p}/self_attention/layer_norm/beta"),
            f"{q}.fc1.weight": t(f"{p}/ffn/linear_0/weight"), f"{q}.fc1.bias": t(f"{p}/ffn/linear_0/bias"),
            f"{q}.fc2.weight": t(f"{p}/ffn/linear_1/weight"), f"{q}.fc2.bias": t(f"{p}/ffn/linear_1/bias"),
            f"{q}.final_layer_norm.weight": t(f"{p}/ffn/layer_norm/gamma"),
            f"{q}.final_layer_norm.bias": t(f"{p}/ffn/layer_norm/beta"),
        })
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise CT2FormatError(f"{model_bin}: weights do not fit WhisperEncoder (missing {missing}, unexpected {unexpected})")
    return enc.eval()

