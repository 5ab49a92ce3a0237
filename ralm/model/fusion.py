"""Fusions of several encoders' adapted streams into one audio token sequence.

The first encoder is the *main* stream (its timeline is the output's); extra encoders are aligned to it
(`sum`), queried by it (`crossattention`) or summarised by learned latents (`perceiver`).
Every stream is `(x (B, T, D), lengths (B,), rate tokens/s)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ralm.model.layers import lengths_to_mask, pick_heads, zero_padding

Stream = tuple[torch.Tensor, torch.Tensor, float]

FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(name: str) -> Callable[[type[Fusion]], type[Fusion]]:
    def deco(cls: type[Fusion]) -> type[Fusion]:
        FUSIONS[name] = cls
        return cls

    return deco


def build_fusion(name: str, names: list[str], dim: int, **options: Any) -> Fusion:
    if name not in FUSIONS:
        raise KeyError(f"unknown fusion {name!r}; registered: {sorted(FUSIONS)}")
    return FUSIONS[name](names, dim, **options)


def align_to(x: torch.Tensor, lengths: torch.Tensor, rate: float, main_len: int, main_rate: float) -> torch.Tensor:
    """Resample a stream onto the main stream's timeline: each main token takes the extra stream's
    frame covering the same instant (nearest, clamped to the extra stream's own length)."""
    t = (torch.arange(main_len, device=x.device, dtype=torch.float64) + 0.5) / main_rate
    idx = torch.floor(t * rate).long()[None, :].expand(x.shape[0], -1)
    idx = torch.minimum(idx, (lengths - 1).clamp(min=0)[:, None])
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Fusion(nn.Module):
    def __init__(self, names: list[str], dim: int, **options: Any):
        super().__init__()
        if not names:
            raise ValueError("fusion needs at least one encoder")
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")
        self.names, self.dim = list(names), dim

    def forward(self, streams: dict[str, Stream]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@register_fusion("sum")
class SumFusion(Fusion):
    """Element-wise sum on the main timeline (with one encoder: the identity)."""

    def forward(self, streams: dict[str, Stream]) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths, rate = streams[self.names[0]]
        for name in self.names[1:]:
            ex, elen, erate = streams[name]
            x = x + align_to(ex, elen, erate, x.shape[1], rate)
        return zero_padding(x, lengths), lengths


@register_fusion("crossattention")
class CrossAttentionFusion(Fusion):
    """The main stream queries each extra encoder through one pre-norm transformer decoder layer."""

    def __init__(self, names: list[str], dim: int, num_heads: int | None = None, ffn_mult: float = 2.0,
                 dropout: float = 0.0):
        super().__init__(names, dim)
        heads = pick_heads(dim, num_heads)
        self.layers = nn.ModuleDict({
            name: nn.TransformerDecoderLayer(dim, heads, int(ffn_mult * dim), dropout, activation="gelu",
                                             batch_first=True, norm_first=True)
            for name in self.names[1:]
        })

    def forward(self, streams: dict[str, Stream]) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths, _ = streams[self.names[0]]
        pad = ~lengths_to_mask(lengths, x.shape[1])
        for name, layer in self.layers.items():
            ex, elen, _ = streams[name]
            x = layer(x, ex, tgt_key_padding_mask=pad, memory_key_padding_mask=~lengths_to_mask(elen, ex.shape[1]))
        return zero_padding(x, lengths), lengths


class _LatentBlock(nn.Module):
    """Learned latents cross-attend (pre-norm) to one stream, then a feed-forward block."""

    def __init__(self, dim: int, num_latents: int, heads: int, ffn_mult: float):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, int(ffn_mult * dim)), nn.GELU(), nn.Linear(int(ffn_mult * dim), dim))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        q = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        kv = self.norm_kv(x)
        h = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=~lengths_to_mask(lengths, x.shape[1]),
                          need_weights=False)[0]
        return h + self.ff(self.norm_ff(h))


@register_fusion("perceiver")
class PerceiverFusion(Fusion):
    """Each extra encoder is summarised by its own learned latents, prepended to the main stream."""

    def __init__(self, names: list[str], dim: int, num_latents: int = 16, num_heads: int | None = None,
                 ffn_mult: float = 2.0):
        super().__init__(names, dim)
        heads = pick_heads(dim, num_heads)
        self.blocks = nn.ModuleDict({n: _LatentBlock(dim, num_latents, heads, ffn_mult) for n in self.names[1:]})
        self.num_latents = num_latents

    def forward(self, streams: dict[str, Stream]) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths, _ = streams[self.names[0]]
        if not self.blocks:
            return x, lengths
        latents = [block(*streams[name][:2]) for name, block in self.blocks.items()]
        return torch.cat([*latents, x], dim=1), lengths + self.num_latents * len(latents)
