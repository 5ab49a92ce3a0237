"""The trained adapter as a standalone artifact: `adapter.safetensors` + `adapter.json`.

Only the frontend's weights are written; the JSON names the frozen LLM (registered name or folder) and
the encoders, so `load_alm(dir)` rebuilds the whole ALM for inference. The LLM's weights never go here.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ralm import storage

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"
FORMAT_VERSION = 1


def frontend_state(model: Any) -> dict[str, torch.Tensor]:
    frontend = getattr(model, "frontend", model)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in frontend.state_dict().items()}


def export_adapter(model: Any, out_dir: str, extra: dict[str, Any] | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> str:
    """Write the ALM's adapter to `out_dir` (local or s3://). `state` overrides the weights (e.g. gathered
    from ZeRO-3 partitions). Returns `out_dir`."""
    state = state if state is not None else frontend_state(model)
    meta = {"format_version": FORMAT_VERSION, **model.meta, **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        save_file({k: v.float() for k, v in state.items()}, local, metadata={"format": "pt"})
        storage.makedirs(out_dir)
        storage.put_file_atomic(local, storage.join(out_dir, WEIGHTS))
    storage.write_json(storage.join(out_dir, CONFIG), meta)
    return out_dir


def read_export_config(export_dir: str) -> dict[str, Any]:
    path = storage.join(export_dir, CONFIG)
    if not storage.exists(path):
        raise FileNotFoundError(f"no exported adapter in {export_dir} ({CONFIG} is missing): run `ralm train` "
                                "(or `ralm run`) first, or point eval.adapters at an exported adapter folder")
    return storage.read_json(path)


def _llm_folder(meta: dict[str, Any], llm: str | None) -> str:
    from ralm.llm.models import ModelNotAvailableError, resolve_model

    for candidate in [llm, meta.get("llm"), meta.get("llm_path")]:
        if not candidate:
            continue
        try:
            return resolve_model(candidate)
        except ModelNotAvailableError:
            continue
    raise FileNotFoundError(f"the adapter's LLM ({meta.get('llm')!r}, {meta.get('llm_path')!r}) is not available "
                            "offline here; pass llm=FOLDER")


def load_alm(export_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32, llm: str | None = None):
    """Rebuild the ALM (frozen LLM + trained adapter) from an export folder (local or s3://)."""
    from ralm.model.alm import ALM

    meta = read_export_config(export_dir)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{export_dir}: adapter format {meta['format_version']} is newer than this ralm")
    model = ALM.build(_llm_folder(meta, llm), meta["encoders"], adapter=meta["adapter"],
                      adapter_hidden=meta["adapter_hidden"], fusion=meta["fusion"],
                      fusion_options=meta.get("fusion_options"), system_prompt=meta.get("system_prompt"),
                      llm_name=meta.get("llm"), dtype=dtype, device=device, seed=None)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        with open(local, "wb") as f:
            f.write(storage.read_bytes(storage.join(export_dir, WEIGHTS)))
        state = load_file(local)
    model.frontend.load_state_dict(state, strict=True)
    model.frontend.to(device=device, dtype=dtype).eval()
    model.meta.update({k: v for k, v in meta.items() if k not in model.meta})
    return model


def dumps_config(export_dir: str) -> str:
    return json.dumps(read_export_config(export_dir), indent=2)
