"""CREPE (torchcrepe's pitch network) as a second, pitch/music-oriented encoder for fusion.

CREPE reads 1024-sample windows at 16 kHz, one per output frame; we centre a window every `hop_length`
samples (default 320 -> 50 frames/s, Whisper's rate, so fusion needs no resampling of frames). Taps are
the six conv blocks (1..6), flattened to channels x remaining frequency bins; `torchcrepe.embed` is
block 5. Tapped blocks must share a width (blocks 4, 5 and 6 do: 256 for `tiny`, 2048 for `full`).
Weights come from the torchcrepe package (`assets/{tiny,full}.pth`), loaded with weights_only=True.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from ralm.config import EncoderSpec
from ralm.encoders.base import Encoder, EncoderInfo, feature_options, freeze, register_encoder

SAMPLE_RATE = 16000
WINDOW = 1024
# (channels, frequency bins) after each block, per capacity; width = product.
_SHAPES = {
    "tiny": [(128, 128), (16, 64), (16, 32), (16, 16), (32, 8), (64, 4)],
    "full": [(1024, 128), (128, 64), (128, 32), (128, 16), (256, 8), (512, 4)],
}


def _capacity(model: str) -> str:
    cap = model.rsplit("-", 1)[-1] if model.startswith("crepe") else model
    if cap not in _SHAPES:
        raise ValueError(f"crepe model must be crepe-tiny or crepe-full (got {model!r})")
    return cap


def _width(cap: str, layers: list[int]) -> int:
    widths = {i + 1: c * h for i, (c, h) in enumerate(_SHAPES[cap])}
    ws = {widths[i] for i in layers}
    if len(ws) != 1:
        raise ValueError(f"crepe layers {layers} have different widths {sorted(ws)}: tap blocks of one width (4-6)")
    return ws.pop()


@register_encoder("crepe")
class CrepeEncoder(Encoder):
    sample_rate = SAMPLE_RATE
    window_s = None  # frames are independent windows: any length works (batched by frame_batch)
    num_layers = 6

    def __init__(self, spec: EncoderSpec):
        super().__init__(spec)
        import torch
        import torchcrepe

        self.capacity = _capacity(spec.model)
        self.layers = self.check_layers(spec.layers, [5], range(1, 7))
        self.width = _width(self.capacity, self.layers)
        self.hop = int(spec.options.get("hop_length", 320))
        self.frame_rate = SAMPLE_RATE / self.hop
        self.frame_batch = int(spec.options.get("frame_batch", 512))
        net = torchcrepe.Crepe(self.capacity)
        weights = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{self.capacity}.pth")
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = freeze(net).to(self.device)

    @classmethod
    def describe(cls, spec: EncoderSpec) -> EncoderInfo:
        cap = _capacity(spec.model)
        layers = list(spec.layers) or [5]
        return EncoderInfo(spec.name, spec.model, layers, _width(cap, layers),
                           SAMPLE_RATE / int(spec.options.get("hop_length", 320)), SAMPLE_RATE, None,
                           feature_options(spec))

    def frames(self, wav: np.ndarray) -> torch.Tensor:
        """(ceil(n / hop), 1024) windows centred every hop, each mean-centred and scaled (as CREPE expects)."""
        import torch
        import torch.nn.functional as F

        n = max(len(wav), 1)
        count = math.ceil(round(n / self.hop, 6))
        audio = torch.from_numpy(np.array(wav, dtype=np.float32)).reshape(1, -1)  # a writable copy
        audio = F.pad(audio, (WINDOW // 2, WINDOW // 2 + count * self.hop))
        fr = audio.unfold(1, WINDOW, self.hop)[0, :count]
        fr = fr - fr.mean(dim=1, keepdim=True)
        return fr / fr.std(dim=1, keepdim=True).clamp_min(1e-10)

    def _blocks(self, frames: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = frames[:, None, :, None].to(self.device)
        convs = [(net.conv1, net.conv1_BN), (net.conv2, net.conv2_BN), (net.conv3, net.conv3_BN),
                 (net.conv4, net.conv4_BN), (net.conv5, net.conv5_BN), (net.conv6, net.conv6_BN)]
        out = []
        for i, (conv, bn) in enumerate(convs[: max(self.layers)], start=1):
            x = net.layer(x, conv, bn, (0, 0, 254, 254)) if i == 1 else net.layer(x, conv, bn)
            if i in self.layers:
                out.append(x.reshape(x.shape[0], -1))  # (frames, channels * freq)
        return out

    def _encode_window(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        results = []
        for wav in wavs:
            fr = self.frames(wav)
            parts = [torch.stack(self._blocks(fr[s : s + self.frame_batch]), 0)
                     for s in range(0, len(fr), self.frame_batch)]
            results.append(torch.cat(parts, dim=1).float().cpu().numpy())
        return results
