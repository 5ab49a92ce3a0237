"""Template task prompts: every record gets prompts that fit its domain and metadata.

A prompt is a `(task, text)` pair; `task` names the metadata key the prompt asks about (so the verifier
can check an answer against the record's own facts) or `describe` / `open` for free-form tasks.
LLM-proposed prompts (`ralm prompts` with `prompts.source: llm`) plug in through `PromptSource`;
these templates stay the fallback.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any, Protocol

# task -> phrasings. A task is offered only when the record's metadata holds that key.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "gender": (
        "Is the speaker male or female?",
        "What is the gender of the person speaking?",
        "Does this voice sound like a man or a woman?",
    ),
    "transcript": (
        "What does the speaker say?",
        "Transcribe the speech in this recording.",
        "Write down the words that are spoken.",
    ),
    "speaking_rate": ("Is the person speaking slowly, at a normal pace, or fast?",),
    "background_noise": (
        "What kind of background noise can be heard behind the voice?",
        "Besides the speech, what noise is present in the recording?",
    ),
    "label": (
        "What sound is this?",
        "Identify the sound event in this clip.",
        "What produces the sound in this recording?",
    ),
    "noise_colour": (
        "Is this white, pink or brown noise?",
        "What colour of noise is this?",
    ),
    "beep_count": (
        "How many beeps are there?",
        "Count the beeps in this clip.",
    ),
    "pitch_register": (
        "Is the pitch of this sound low, middle or high?",
        "Would you describe the pitch as low, medium or high?",
    ),
    "sweep_direction": ("Does the tone rise or fall in pitch?",),
    "instrument": (
        "Which instrument is playing?",
        "What instrument do you hear in this music?",
    ),
    "key": ("What key is this music in?",),
    "mode": ("Is this piece in a major or a minor key?",),
    "tempo": (
        "Is the tempo of this music slow, moderate or fast?",
        "How fast is this music?",
    ),
    "category": ("What kind of sound or sample is this?",),
    "describe": (
        "Describe what you hear in this audio.",
        "Give a short description of this audio clip.",
    ),
}

DOMAIN_TASKS: dict[str, tuple[str, ...]] = {
    "speech": ("gender", "transcript", "speaking_rate", "background_noise", "describe"),
    "sound": ("label", "noise_colour", "beep_count", "pitch_register", "sweep_direction", "category", "describe"),
    "music": ("instrument", "key", "mode", "tempo", "pitch_register", "category", "describe"),
    # The spoken instruction is the task itself: the prompt just asks to follow it.
    "instruction": ("instruction",),
}
INSTRUCTION_PROMPTS = (
    "Respond to the spoken request.",
    "Answer the question asked in the audio.",
)


class PromptSource(Protocol):
    """Anything that proposes (task, prompt) pairs for a record (templates here, the LLM in selfgen)."""

    def __call__(self, record: Mapping[str, Any], k: int, seed: int) -> list[tuple[str, str]]: ...


def _rng(record: Mapping[str, Any], seed: int) -> random.Random:
    digest = hashlib.sha1(f"{record['clip_id'] or record['id']}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def available_tasks(record: Mapping[str, Any]) -> list[str]:
    domain = record.get("domain") or "sound"
    meta = record.get("metadata") or {}
    tasks = []
    for task in DOMAIN_TASKS.get(domain, DOMAIN_TASKS["sound"]):
        if task in ("describe", "instruction"):
            tasks.append(task)
        elif task in meta:
            tasks.append(task)
    return tasks


def template_prompts(record: Mapping[str, Any], k: int = 1, seed: int = 0,
                     weights: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """k distinct (task, prompt) pairs for a record, deterministic for (clip, seed).

    Verifiable tasks (a metadata fact) come before free description, so targets can be checked.
    `weights` (task -> weight, 1 when unlisted, 0 = never) make some tasks likelier to be picked: a
    small training budget is better spent on a few facts it can learn than on many it cannot.
    """
    rng = _rng(record, seed)
    if record.get("domain") == "instruction":
        return [("instruction", rng.choice(INSTRUCTION_PROMPTS))]
    tasks = available_tasks(record)
    if weights:
        tasks = [t for t in tasks if weights.get(t, 1.0) > 0]
    factual = [t for t in tasks if t != "describe"]
    if weights:  # weighted order without replacement: sort by u ** (1 / w) (Efraimidis-Spirakis)
        keys = {t: rng.random() ** (1.0 / weights.get(t, 1.0)) for t in factual}
        factual.sort(key=lambda t: -keys[t])
    else:
        rng.shuffle(factual)
    ordered = factual + [t for t in tasks if t == "describe"]
    return [(task, rng.choice(TEMPLATES[task])) for task in ordered[:k]]
