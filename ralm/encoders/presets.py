"""Hub-id encoders of the paper preset (ALARM: Whisper-large-v3 + W2V-BERT 2.0 + SSLAM + MuQ).

They load on a cluster that can reach the hub (or has it cached); nothing here downloads at import or
in tests. `describe` answers from the table below, so the storage math and training's adapters work on a
CPU driver without the weights. Whisper-large-v3 itself is the `whisper` encoder with
`model: openai/whisper-large-v3` (layers 7, 15, 23, 31).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


@dataclass(frozen=True)
class HubPreset:
    hub_id: str
    sample_rate: int
    frame_rate: float
    width: int
    num_layers: int
    default_layers: list[int]
    window_s: float = 30.0
    loader: str = "auto"  # auto: AutoModel + AutoFeatureExtractor; muq: the `muq` package
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# Widths / rates from the models' cards and configs; layer taps spread over depth like Whisper's.
PRESETS: dict[str, HubPreset] = {
    "w2v-bert": HubPreset("facebook/w2v-bert-2.0", 16000, 50.0, 1024, 24, [6, 12, 18, 24]),
    # SSLAM (ICLR 2025, an EAT/data2vec-style audio SSL model on 16 kHz fbank patches).
    "sslam": HubPreset("ta012/SSLAM_pretrain", 16000, 50.0, 768, 12, [4, 8, 12], window_s=10.0,
                       trust_remote_code=True),
    # MuQ (music SSL, 24 kHz, 25 Hz), needs `pip install muq` on the cluster image.
    "muq": HubPreset("OpenMuQ/MuQ-large-msd-iter", 24000, 25.0, 1024, 12, [4, 8, 12], window_s=30.0,
                     loader="muq"),
}


def preset_for(spec: EncoderSpec) -> HubPreset:
    key = spec.model if spec.model in PRESETS else spec.name
    if key not in PRESETS:
        for p in PRESETS.values():
            if p.hub_id == spec.model:
                return p
        raise KeyError(f"no hub preset for encoder {spec.name!r} / model {spec.model!r}; known: {sorted(PRESETS)}")
    return PRESETS[key]


class HubEncoder(Encoder):
    """transformers AutoModel with `output_hidden_states` (hidden_states[0] = embeddings, i = block i)."""

    def __init__(self, spec: EncoderSpec):
        super().__init__(spec)
        p = preset_for(spec)
        self.preset = p
        self.sample_rate, self.frame_rate, self.width = p.sample_rate, p.frame_rate, p.width
        self.window_s, self.num_layers = p.window_s, p.num_layers
        self.layers = self.check_layers(spec.layers, p.default_layers, range(0, p.num_layers + 1))
        model_id = spec.model if spec.model not in PRESETS else p.hub_id
        if p.loader == "muq":
            from muq import MuQ  # type: ignore[import-not-found]  # cluster image only

            self.net = MuQ.from_pretrained(model_id)
            self.processor = None
        else:
            lean_transformers_import()
            from transformers import AutoFeatureExtractor, AutoModel

            self.net = AutoModel.from_pretrained(model_id, trust_remote_code=p.trust_remote_code)
            self.processor = AutoFeatureExtractor.from_pretrained(model_id, trust_remote_code=p.trust_remote_code)
        self.net = freeze(self.net).to(self.device)

    @classmethod
    def describe(cls, spec: EncoderSpec) -> EncoderInfo:
        p = preset_for(spec)
        return EncoderInfo(spec.name, spec.model, list(spec.layers) or list(p.default_layers), p.width,
                           p.frame_rate, p.sample_rate, p.window_s, feature_options(spec))

    def _encode_window(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        if self.processor is None:  # MuQ takes raw 24 kHz audio
            lens = [len(w) for w in wavs]
            x = torch.zeros(len(wavs), max(lens))
            for i, w in enumerate(wavs):
                x[i, : len(w)] = torch.from_numpy(w)
            out = self.net(x.to(self.device), output_hidden_states=True)
        else:
            inputs = self.processor(list(wavs), sampling_rate=self.sample_rate, return_tensors="pt", padding=True)
            out = self.net(**{k: v.to(self.device) for k, v in inputs.items()}, output_hidden_states=True)
        hs = torch.stack([out.hidden_states[i] for i in self.layers], 1).float().cpu().numpy()
        res = []
        for b, w in enumerate(wavs):
            n = frames_for(len(w) / self.sample_rate, self.frame_rate)
            arr = hs[b, :, :n]
            if arr.shape[1] < n:  # models that drop a trailing partial frame: repeat the last one
                arr = np.concatenate([arr, np.repeat(arr[:, -1:], n - arr.shape[1], axis=1)], axis=1)
            res.append(arr)
        return res


for _name in PRESETS:
    register_encoder(_name)(type(f"Hub_{_name.replace('-', '_').replace('.', '_')}", (HubEncoder,), {}))
