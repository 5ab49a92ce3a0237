"""ALARM's textual surrogate of a clip.

    [mm:ss-mm:ss] transcript or |caption| (duration: Ns, key: value, ...)
    [00:00-00:07, the first speaker] ... [00:07-00:19, the second speaker] ... (duration: 19s, ...)

Only original metadata goes in; keys come in a stable order (preferred keys first, then alphabetical)
so the same record always gives the same text (prefix caching and determinism depend on it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_ORDINALS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
]

# Keys a reader wants first; the rest follow alphabetically.
KEY_ORDER = ("gender", "label", "category", "instrument", "key", "tempo_bpm", "language")
# Keys that never enter the details: the transcript/caption are the body already; the rest is
# bookkeeping (or an instruction's answer), not something one hears.
HIDDEN_KEYS = frozenset({"transcript", "caption", "answer", "synthesizer", "voice", "source_file"})


def ordinal(n: int) -> str:
    """1 -> 'first' ... 20 -> 'twentieth', then '21st', '22nd', ..."""
    if n < 1:
        raise ValueError(f"ordinal of {n}")
    if n <= len(_ORDINALS):
        return _ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def timestamp(seconds: float) -> str:
    total = max(0, int(round(seconds)))
    return f"{total // 60:02d}:{total % 60:02d}"


def format_duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 or abs(seconds - round(seconds)) < 0.05 else f"{seconds:.1f}s"


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    speaker: int | None = None  # 1-based speaker number; None for a single speaker


def ordered_items(metadata: Mapping[str, object]) -> list[tuple[str, str]]:
    keys = [k for k in metadata if k not in HIDDEN_KEYS and metadata[k] not in (None, "")]
    first = [k for k in KEY_ORDER if k in keys]
    rest = sorted(k for k in keys if k not in KEY_ORDER)
    return [(k, str(metadata[k])) for k in first + rest]


def format_surrogate(
    duration_s: float,
    *,
    transcript: str | None = None,
    caption: str | None = None,
    segments: Sequence[Segment] | None = None,
    metadata: Mapping[str, object] | None = None,
) -> str:
    """Build the surrogate. Exactly one of transcript / caption / segments describes the content."""
    if sum(x is not None and x != "" and x != [] for x in (transcript, caption, segments)) > 1:
        raise ValueError("give one of transcript, caption or segments")
    if segments:
        multi = len({s.speaker for s in segments if s.speaker is not None}) > 1
        body = " ".join(
            f"[{timestamp(s.start)}-{timestamp(s.end)}"
            + (f", the {ordinal(s.speaker)} speaker" if multi and s.speaker is not None else "")
            + f"] {s.text.strip()}"
            for s in segments
        )
    elif transcript:
        body = f"[{timestamp(0)}-{timestamp(duration_s)}] {transcript.strip()}"
    elif caption:
        body = f"[{timestamp(0)}-{timestamp(duration_s)}] |{caption.strip()}|"
    else:
        body = f"[{timestamp(0)}-{timestamp(duration_s)}]"
    details = [f"duration: {format_duration(duration_s)}"]
    details += [f"{k.replace('_', ' ')}: {v}" for k, v in ordered_items(metadata or {})]
    return f"{body} ({', '.join(details)})"
