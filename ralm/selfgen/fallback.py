"""Grounded fallback targets: a plain answer built from the record's own facts, in hearing language.

Used only when the frozen LLM produced no verified answer within best-of-N (the demo's 135M model often
can't). Such targets are NOT self-generated: the generate stage labels them
`verdicts["target_source"] = "metadata_fallback"` and the audit counts them, so nobody mistakes them for
the method's targets. `generation.fallback: reject` turns them off (the row becomes a reject instead).
Every sentence here must pass the leak detector and the verifier (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ralm.selfgen.verify import facts_of

_NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}

Sentence = Callable[[str], str]
SENTENCES: dict[str, Sentence] = {
    "gender": lambda v: f"The speaker sounds {v}.",
    "transcript": lambda v: f'The speaker says: "{v}"',
    "speaking_rate": lambda v: f"The person speaks at a {v} pace.",
    "background_noise": lambda v: f"Behind the voice I can hear {v}.",
    "label": lambda v: f"It sounds like {_article(v)} {v}.",
    "noise_colour": lambda v: f"This sounds like {v} noise.",
    "beep_count": lambda v: f"I hear {_count_words(v)}.",
    "pitch_register": lambda v: f"The pitch sounds {v}.",
    "sweep_direction": lambda v: f"The tone is {v} in pitch.",
    "instrument": lambda v: f"I hear {_article(v)} {v} playing.",
    "key": lambda v: f"The music sounds like it is in {v}.",
    "mode": lambda v: f"The piece sounds {v}.",
    "tempo": lambda v: f"The tempo sounds {v}.",
    "tempo_bpm": lambda v: f"The tempo is about {v} bpm.",
    "category": lambda v: f"It sounds like {v}.",
    "answer": lambda v: f"The answer is {v}.",
}
# Facts a free description mentions, in this order.
DESCRIBE_ORDER = ("label", "instrument", "gender", "transcript", "noise_colour", "beep_count", "pitch_register",
                  "sweep_direction", "key", "tempo", "background_noise")


def _article(v: str) -> str:
    return "an" if v[:1].lower() in "aeiou" else "a"


def _count_words(v: str) -> str:
    try:
        n = int(v)
    except ValueError:
        return f"{v} beeps"
    return f"{_NUM.get(n, str(n))} beep{'s' if n != 1 else ''}"


def grounded_answer(task: str | None, record: Mapping[str, Any]) -> str | None:
    """A short true answer to a prompt about `task`, or None when the record holds no fitting fact."""
    facts = facts_of(record)
    meta = record.get("metadata") or {}
    if record.get("domain") == "instruction":
        return SENTENCES["answer"](str(meta["answer"])) if meta.get("answer") else None
    if task in SENTENCES and task in facts:
        return SENTENCES[task](facts[task])
    parts = [SENTENCES[k](facts[k]) for k in DESCRIBE_ORDER if k in facts][:3]
    return " ".join(parts) if parts else None
