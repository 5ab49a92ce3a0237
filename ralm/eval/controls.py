"""Controls that show answers come from the audio: shuffled audio, silence, and chance level.

A control is the same item list with each item's audio replaced; it runs through exactly the same
inference and scoring as the real condition. A model that hears nothing useful scores near chance on both.
- `shuffled`: every item gets the audio of a *different clip* (a random cycle over the distinct clips, so
  no item keeps its own audio even when several questions share one clip).
- `silence`: digital silence as long as the item's own audio (`silence:<uri>`; see `load_item_audio`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ralm.audio.io import load_audio, probe
from ralm.eval.benchmarks import MCQItem
from ralm.eval.scoring import chance_level

SILENCE_PREFIX = "silence:"

Control = Callable[[Sequence[MCQItem], int], list[MCQItem]]
CONTROLS: dict[str, Control] = {}


def register_control(name: str) -> Callable[[Control], Control]:
    def deco(fn: Control) -> Control:
        CONTROLS[name] = fn
        return fn

    return deco


class ControlError(ValueError):
    pass


@register_control("shuffled")
def shuffled(items: Sequence[MCQItem], seed: int = 0) -> list[MCQItem]:
    clips = sorted({it.audio for it in items})
    if len(clips) < 2:
        raise ControlError("the shuffled-audio control needs items from at least 2 different clips")
    order = clips[:]
    random.Random(seed).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [replace(it, audio=other[it.audio]) for it in items]


@register_control("silence")
def silence(items: Sequence[MCQItem], seed: int = 0) -> list[MCQItem]:
    return [replace(it, audio=SILENCE_PREFIX + it.audio) for it in items]


def apply_control(name: str, items: Sequence[MCQItem], seed: int = 0) -> list[MCQItem]:
    if name not in CONTROLS:
        raise KeyError(f"unknown control {name!r}; known: {sorted(CONTROLS)}")
    return CONTROLS[name](items, seed)


def chance(items: Sequence[MCQItem]) -> float:
    """Expected accuracy of a uniform random pick (items may have different numbers of choices)."""
    return chance_level(len(it.choices) for it in items)


def load_item_audio(uri: str, sample_rate: int, min_seconds: float = 0.1) -> np.ndarray:
    """Decode an item's audio, or make the silence control's zeros (as long as the original clip)."""
    if uri.startswith(SILENCE_PREFIX):
        original = uri[len(SILENCE_PREFIX):]
        try:
            seconds = probe(original).duration_s
        except Exception:
            seconds = len(load_audio(original, sample_rate)) / sample_rate
        return np.zeros(max(int(round(max(seconds, min_seconds) * sample_rate)), 1), dtype=np.float32)
    return load_audio(uri, sample_rate)
