"""Per-encoder adapters: mixed encoder frames (B, T, d) -> LLM-width tokens (B, T', D).

Every adapter takes and returns lengths so padded frames never leak into real ones, and declares its
`stride` (input frames per output token) so fusion can align encoders running at different rates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ralm.model.layers import ChannelNorm, zero_padding

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def deco(cls: type[Adapter]) -> type[Adapter]:
        ADAPTERS[name] = cls
        return cls

    return deco


def build_adapter(name: str, in_dim: int, out_dim: int, hidden: int) -> Adapter:
    if name not in ADAPTERS:
        raise KeyError(f"unknown adapter {name!r}; registered: {sorted(ADAPTERS)}")
    return ADAPTERS[name](in_dim, out_dim, hidden)


class Adapter(nn.Module):
    stride: int = 1

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@register_adapter("downsampler")
class Downsampler(Adapter):
    """ALARM's adapter: Linear d->h; Conv1d k3 h->2h + GELU + norm; Conv1d k4 s2 2h->h + GELU + norm;
    Linear h->D. Halves the frame rate (50 Hz Whisper frames -> 25 tokens/s)."""

    stride = 2

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__(in_dim, out_dim, hidden)
        self.proj_in = nn.Linear(in_dim, hidden)
        self.conv1 = nn.Conv1d(hidden, 2 * hidden, kernel_size=3, padding=1)
        self.norm1 = ChannelNorm(2 * hidden)
        self.conv2 = nn.Conv1d(2 * hidden, hidden, kernel_size=4, stride=2, padding=1)
        self.norm2 = ChannelNorm(hidden)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(hidden, out_dim)

    @staticmethod
    def strided_lengths(lengths: torch.Tensor) -> torch.Tensor:
        # Conv1d(k=4, s=2, p=1): floor((T + 2 - 4) / 2) + 1, at least one token for any non-empty clip.
        return torch.clamp(torch.div(lengths - 2, 2, rounding_mode="floor") + 1, min=1)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.strided_lengths(lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] < 2:  # the strided conv needs two frames
            x = nn.functional.pad(x, (0, 0, 0, 2 - x.shape[1]))
        h = zero_padding(self.proj_in(x), lengths).transpose(1, 2)
        h = self.norm1(self.act(self.conv1(h)))
        h = zero_padding(h.transpose(1, 2), lengths).transpose(1, 2)
        h = self.norm2(self.act(self.conv2(h))).transpose(1, 2)
        out_len = self.strided_lengths(lengths)
        return zero_padding(self.proj_out(h), out_len), out_len


class PooledDownsampler(Downsampler):
    """The downsampler on frames averaged in groups of `pool` (a clip's last, partial group over its own
    frames): `2 * pool` input frames per token. For small budgets (CPU) where the audio block is most of the
    LLM's sequence and its cost; global facts (voice, timbre, noise colour) survive the pooling."""

    pool: int  # frames per group, set by each registered size

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__(in_dim, out_dim, hidden)
        self.stride = 2 * self.pool

    def _pooled_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.pool - 1, self.pool, rounding_mode="floor")

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.strided_lengths(self._pooled_lengths(lengths))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = zero_padding(x, lengths)
        if x.shape[1] % self.pool:
            x = nn.functional.pad(x, (0, 0, 0, self.pool - x.shape[1] % self.pool))
        groups = x.reshape(x.shape[0], x.shape[1] // self.pool, self.pool, x.shape[2]).sum(2)
        pooled = self._pooled_lengths(lengths)
        # frames per group: `pool`, except a clip's last group when its length is not a multiple of `pool`
        start = torch.arange(groups.shape[1], device=x.device)[None] * self.pool
        counts = (lengths[:, None] - start).clamp(min=1, max=self.pool).to(x.dtype)
        return super().forward(groups / counts[..., None], pooled)


@register_adapter("downsampler4")
class Downsampler4(PooledDownsampler):
    """12.5 tokens/s from Whisper's 50 Hz frames."""

    pool = 2


@register_adapter("downsampler8")
class Downsampler8(PooledDownsampler):
    """6.25 tokens/s from Whisper's 50 Hz frames."""

    pool = 4


@register_adapter("downsampler16")
class Downsampler16(PooledDownsampler):
    """3.125 tokens/s from Whisper's 50 Hz frames."""

    pool = 8


@register_adapter("mlp")
class MLPAdapter(Adapter):
    """Frame-wise two-layer MLP (keeps the frame rate): Linear d->h, GELU, Linear h->D."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__(in_dim, out_dim, hidden)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return zero_padding(self.net(x), lengths), lengths
