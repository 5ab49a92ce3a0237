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
