"""Small building blocks shared by adapters and fusions."""

from __future__ import annotations

import torch
from torch import nn


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True at valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero the frames past each sample's length so batched and single-sample outputs agree exactly."""
    return x * lengths_to_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)


class LayerMix(nn.Module):
    """Softmax-weighted average of an encoder's tapped layers: (B, L, T, d) -> (B, T, d).

    Zero-initialised logits start as a plain mean; the weights learn which depth matters.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.logits.numel():
            raise ValueError(f"expected {self.logits.numel()} tapped layers, got {x.shape[1]}")
        w = torch.softmax(self.logits.float(), dim=0).to(x.dtype)
        return torch.einsum("l,bltd->btd", w, x)


class AudioTokenNorm(nn.Module):
    """Centre and scale audio tokens with statistics over real (unpadded) tokens of the data, per channel,
    then a learned per-channel gain starting at the LLM's embedding scale. No bias, on purpose.

    Without it a fresh adapter's cheapest way to lower the loss is to emit one constant vector for every
    clip (a soft prompt) and drown the clip's content: measured on the demo, the trained adapter's
    clip-mean outputs had pairwise cosine 0.9998 and the held-out MCQ could not tell real audio from
    shuffled audio or silence. Centred tokens cannot carry a constant; the learned audio start/end
    embeddings are where a soft prompt can live. Running statistics (batch-norm style, padding excluded)
    are used at inference and saved with the adapter.
    """

    def __init__(self, dim: int, init_gain: float, momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.full((dim,), float(init_gain)))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("tracked", torch.zeros((), dtype=torch.long))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = lengths_to_mask(lengths, x.shape[1])
        if self.training:
            real = x[mask].float()  # (N, D): every real token of the batch
            mean, var = real.mean(0), real.var(0, unbiased=False)
            with torch.no_grad():
                m = 1.0 if int(self.tracked) == 0 else self.momentum  # first batch: take its statistics
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach(), m)
                self.tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        y = (x.float() - mean) * torch.rsqrt(var + self.eps) * self.gain.float()
        return (y * mask.unsqueeze(-1)).to(x.dtype)


class ChannelNorm(nn.Module):
    """LayerNorm over channels for (B, C, T) conv activations."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def pick_heads(dim: int, wanted: int | None = None) -> int:
    """The requested head count, or the largest of 16/8/4/2/1 that divides `dim`."""
    if wanted:
        if dim % wanted:
            raise ValueError(f"num_heads={wanted} does not divide width {dim}")
        return wanted
    return next(h for h in (16, 8, 4, 2, 1) if dim % h == 0 and dim // h >= 16 or h == 1)
