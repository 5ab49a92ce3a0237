"""Sampling that does not depend on the batch: what a row draws is a function of its own seed alone.

Shared by the transformers paths (the text stages' fallback engine and the ALM's back end); vLLM seeds
each request's own generator already.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# generate() kwargs for greedy decoding whatever the checkpoint's generation_config asks for
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class SeededSampling:
    """Temperature / top-p sampling as greedy decoding over noisy log-probabilities, one generator per row
    (a `generate(logits_processor=...)` with `do_sample=False`): the argmax of log p plus Gumbel noise is a
    draw from p, and a row's noise comes from its own seed and step alone. Prompts with different seeds
    share one batched `generate` (HF's sampler draws from one generator for the whole batch, so a row's
    draw would depend on the rows beside it), each drawing what it draws alone, and the process-wide torch
    seed is left alone (a server samples for many clients at once)."""

    def __init__(self, seeds: Sequence[int | None], temperature: float, top_p: float = 1.0):
        # no seed asked for: a fresh one, drawn now so the row's generator is fixed however it is placed
        self.seeds = [int(s) if s is not None else torch.Generator().seed() for s in seeds]
        self.generators: list[torch.Generator] = []
        self.temperature, self.top_p = temperature, top_p

    def _generators_on(self, device: torch.device) -> list[torch.Generator]:
        # made where the logits are: noise drawn on the CPU would be a batch x vocab copy per token on a GPU
        if not self.generators or self.generators[0].device != device:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return self.generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p (at least one)
            sorted_lp, order = logp.sort(dim=-1, descending=True)
            p = sorted_lp.exp()
            drop = (p.cumsum(-1) - p) >= self.top_p
            logp = logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        vocab, device = logp.shape[-1], logp.device
        u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in self._generators_on(device)])
        return logp - torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))

    def kwargs(self) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList([self])}


def sample_seeds(seed: int | None, n: int) -> list[int | None]:
    """Seeds for the `n` samples of one request: the first is the request's own (so n=1 draws what it
    always drew), the others derived from it; `None` (unseeded) stays fresh for each."""
    if seed is None:
        return [None] * n
    return [int(seed)] + [hash((int(seed), j)) & (2**63 - 1) for j in range(1, n)]
