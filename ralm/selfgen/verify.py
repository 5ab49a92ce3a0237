"""Metadata verifier: is a response true to the facts the record holds?

`verify(task, response, record)` -> `Verdict(status, reason)` with status `agree`, `disagree` or
`unverifiable`. A checker is registered per task (the metadata key the prompt asks about). Every checker
is strict on purpose — a small LLM invents facts, and a wrong target teaches the ALM to hallucinate:
- the expected value must be stated, and no competing value may be (a "male or female?" answer that
  says both, or hedges, disagrees);
- besides the asked fact, any *other* categorical fact the response contradicts (calling a female voice
  male while asked to describe the clip) makes it disagree;
- the answer part is checked (text after the closing think tag when there is one; the whole text when the
  response has no answer part, e.g. truncated inside its thought); quoted spoken words are ignored for
  the categorical checks, so a transcript containing "he" does not decide the speaker's gender.
Open/describe tasks agree when they state at least one of the record's facts and contradict none;
`unverifiable` means the record holds nothing to check the response against (or it states none of it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

AGREE, DISAGREE, UNVERIFIABLE = "agree", "disagree", "unverifiable"


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str

    @property
    def agrees(self) -> bool:
        return self.status == AGREE


# ---------------------------------------------------------------------------------------------- text helpers
_WORD = re.compile(r"[a-z0-9#\u266f\u266d']+")
_QUOTED = re.compile(r"\"[^\"\n]*\"|\u201c[^\u201d\n]*\u201d")
STOPWORDS = frozenset(
    "a an the of to in on at for and or but is are was were be been it its this that these those with as by "
    "from i you he she we they me my your our their his her him them there here so do does did not no yes "
    "what which who how can could would should will shall may might just very some any all".split()
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def stem(w: str) -> str:
    """A crude stemmer: beeps->beep, ringing->ring, ringer stays. Enough to match class names."""
    for suf in ("ing", "es", "s"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            w = w[: -len(suf)]
            break
    return w


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def answer_part(response: str, close_tag: str = "</think>") -> str:
    """The text after the thought (the answer); the whole response when it has no finished thought."""
    if close_tag in response:
        after = response.rsplit(close_tag, 1)[1].strip()
        if after:
            return after
    return response


def unquoted(text: str) -> str:
    return _QUOTED.sub(" ", text)


def _has_any(text_words: set[str], phrases: tuple[str, ...], text: str) -> list[str]:
    hits = []
    for p in phrases:
        if " " in p or "-" in p:
            if re.search(rf"\b{re.escape(p)}\b", text):
                hits.append(p)
        elif p in text_words:
            hits.append(p)
    return hits


# ---------------------------------------------------------------------------------------------- categories
# value -> words that state it. A response agrees when it states the expected value and no other.
CATEGORIES: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {
        "male": ("male", "man", "men", "boy", "gentleman", "masculine", "he", "his", "him", "guy"),
        "female": ("female", "woman", "women", "girl", "lady", "feminine", "she", "her", "hers"),
    },
    "noise_colour": {
        "white": ("white",),
        "pink": ("pink",),
        "brown": ("brown", "brownian", "red"),
        "_other": ("blue", "violet", "grey", "gray", "purple", "green"),
    },
    "pitch_register": {
        "low": ("low", "deep", "bass", "low-pitched"),
        "middle": ("middle", "mid", "medium", "moderate", "mid-range"),
        "high": ("high", "shrill", "treble", "high-pitched"),
    },
    "sweep_direction": {
        "rising": ("rising", "rises", "rise", "ascending", "upward", "upwards", "increasing", "goes up"),
        "falling": ("falling", "falls", "fall", "descending", "downward", "downwards", "decreasing",
                    "goes down"),
    },
    "mode": {"major": ("major",), "minor": ("minor",)},
    "tempo": {
        "slow": ("slow", "slowly", "largo", "adagio", "leisurely"),
        "moderate": ("moderate", "moderately", "medium", "andante", "moderato", "mid-tempo"),
        "fast": ("fast", "quick", "quickly", "rapid", "allegro", "presto", "brisk"),
    },
    "speaking_rate": {
        "slow": ("slow", "slowly"),
        "normal": ("normal", "moderate", "average", "regular", "medium"),
        "fast": ("fast", "quick", "quickly", "rapid", "rapidly"),
    },
}
CATEGORIES["background_noise"] = {
    f"{c} noise": v for c, v in CATEGORIES["noise_colour"].items() if not c.startswith("_")
} | {"_other": CATEGORIES["noise_colour"]["_other"]}

# Instruments a response may name; naming one that is not the expected one disagrees.
INSTRUMENTS = (
    "piano", "violin", "viola", "cello", "contrabass", "flute", "piccolo", "clarinet", "oboe", "bassoon",
    "saxophone", "sax", "trumpet", "trombone", "tuba", "horn", "guitar", "harp", "organ", "accordion",
    "harmonica", "marimba", "xylophone", "vibraphone", "glockenspiel", "celesta", "harpsichord",
    "banjo", "sitar", "drum", "drums", "synthesizer", "synth", "bell", "bells", "strings", "choir",
    "recorder", "ukulele", "mandolin", "timpani", "kalimba", "bagpipe", "bagpipes", "fiddle",
)

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "once": 1, "twice": 2, "thrice": 3, "single": 1,
    "a single": 1, "double": 2, "triple": 3,
}
_COUNT_NOUNS = r"(?:beeps?|tones?|times|pulses?|sounds?|signals?|chirps?|bleeps?|blips?|notes?|rings?)"
_NUM = r"(?:\d+|" + "|".join(sorted((k for k in NUMBER_WORDS if " " not in k), key=len, reverse=True)) + r")"
_COUNT_RX = re.compile(rf"\b({_NUM})\s+(?:\w+\s+)?{_COUNT_NOUNS}\b|\b(once|twice|thrice)\b")
_BARE_NUM_RX = re.compile(rf"\b({_NUM})\b")


def _to_int(tok: str) -> int | None:
    tok = tok.lower()
    if tok.isdigit():
        return int(tok)
    return NUMBER_WORDS.get(tok)


def mentioned_values(key: str, text: str) -> set[str]:
    """Which values of a categorical key the text states."""
    lower = unquoted(text).lower()
    tw = set(words(lower))
    found = set()
    for value, phrases in CATEGORIES[key].items():
        if _has_any(tw, phrases, lower):
            found.add(value)
    return found


# ---------------------------------------------------------------------------------------------- checkers
Checker = Callable[[str, str, Mapping[str, Any]], Verdict]
CHECKERS: dict[str, Checker] = {}


def register(*tasks: str) -> Callable[[Checker], Checker]:
    def deco(fn: Checker) -> Checker:
        for t in tasks:
            CHECKERS[t] = fn
        return fn

    return deco


def _norm_value(key: str, value: str) -> str:
    v = value.strip().lower()
    if key == "noise_colour":
        v = v.replace(" noise", "")
    return v


def check_category(key: str, text: str, expected_raw: str) -> Verdict:
    expected = _norm_value(key, expected_raw)
    if expected not in CATEGORIES[key]:
        return Verdict(UNVERIFIABLE, f"{key}={expected_raw!r} has no known wording")
    found = mentioned_values(key, text)
    others = sorted(found - {expected})
    if expected in found and not others:
        return Verdict(AGREE, f"{key}: states {expected}")
    if others:
        return Verdict(DISAGREE, f"{key}: expected {expected}, states {', '.join(others)}")
    return Verdict(DISAGREE, f"{key}: expected {expected}, not stated")


@register(*CATEGORIES)
def _category(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    return check_category(task, text, str(meta[task]))


def _phrase_present(phrase: str, text: str) -> bool:
    want = [stem(w) for w in content_words(phrase)]
    have = {stem(w) for w in words(text)}
    return bool(want) and all(w in have for w in want)


@register("label", "category")
def _label(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    expected = str(meta[task])
    if not content_words(expected):
        return Verdict(UNVERIFIABLE, f"{task}={expected!r} has no content words")
    if not _phrase_present(expected, unquoted(text)):
        return Verdict(DISAGREE, f"{task}: expected {expected!r}, not stated")
    # A noise label ("white noise") must also not name another colour.
    colour = next((c for c in ("white", "pink", "brown") if c in words(expected)), None)
    if colour:
        v = check_category("noise_colour", text, colour)
        if not v.agrees:
            return Verdict(DISAGREE, f"{task}: {v.reason}")
    return Verdict(AGREE, f"{task}: states {expected!r}")


@register("instrument")
def _instrument(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    expected = str(meta["instrument"]).lower()
    clean = unquoted(text).lower()
    if not _phrase_present(expected, clean):
        return Verdict(DISAGREE, f"instrument: expected {expected!r}, not stated")
    allowed = {stem(w) for w in words(expected)}
    others = sorted({w for w in words(clean) if w in INSTRUMENTS and stem(w) not in allowed})
    if others:
        return Verdict(DISAGREE, f"instrument: expected {expected!r}, also names {', '.join(others)}")
    return Verdict(AGREE, f"instrument: states {expected!r}")


_KEY_RX = re.compile(
    r"\b([a-g])\s*(#|\u266f|b|\u266d|-?sharp|-?flat)?\s*(major|minor|maj|min)\b", re.IGNORECASE
)


def _norm_key(letter: str, acc: str | None, mode: str) -> str:
    acc = (acc or "").lower().lstrip("-")
    acc = {"#": "#", "\u266f": "#", "sharp": "#", "b": "b", "\u266d": "b", "flat": "b"}.get(acc, "")
    mode = "major" if mode.lower().startswith("maj") else "minor"
    return f"{letter.upper()}{acc} {mode}"


@register("key")
def _key(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    m = _KEY_RX.fullmatch(str(meta["key"]).strip())
    if not m:
        return Verdict(UNVERIFIABLE, f"key={meta['key']!r} not parseable")
    expected = _norm_key(*m.groups())
    stated = {_norm_key(*x.groups()) for x in _KEY_RX.finditer(unquoted(text))}
    if stated == {expected}:
        return Verdict(AGREE, f"key: states {expected}")
    if stated - {expected}:
        return Verdict(DISAGREE, f"key: expected {expected}, states {', '.join(sorted(stated - {expected}))}")
    return Verdict(DISAGREE, f"key: expected {expected}, not stated")


def stated_counts(text: str) -> list[int]:
    """Counts the text states: '3 beeps', 'three short tones', 'twice'."""
    out = []
    for m in _COUNT_RX.finditer(unquoted(text).lower()):
        n = _to_int(m.group(1) or m.group(2))
        if n is not None:
            out.append(n)
    return out


@register("beep_count")
def _count(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    try:
        expected = int(str(meta[task]).strip())
    except ValueError:
        return Verdict(UNVERIFIABLE, f"{task}={meta[task]!r} is not a number")
    counts = stated_counts(text)
    if not counts:  # a bare number ("Three.") still counts when it is the only number stated
        counts = [n for n in (_to_int(t) for t in _BARE_NUM_RX.findall(unquoted(text).lower())) if n is not None]
    if not counts:
        return Verdict(DISAGREE, f"{task}: expected {expected}, no count stated")
    wrong = sorted({n for n in counts if n != expected})
    if wrong:
        return Verdict(DISAGREE, f"{task}: expected {expected}, states {', '.join(map(str, wrong))}")
    return Verdict(AGREE, f"{task}: states {expected}")


@register("tempo_bpm")
def _bpm(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    try:
        expected = float(meta[task])
    except ValueError:
        return Verdict(UNVERIFIABLE, f"{task}={meta[task]!r} is not a number")
    stated = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*(?:bpm|beats per minute)", text.lower())]
    if not stated:
        return Verdict(DISAGREE, f"{task}: expected {expected:g} bpm, not stated")
    bad = [s for s in stated if abs(s - expected) > 0.08 * expected]
    if bad:
        return Verdict(DISAGREE, f"{task}: expected {expected:g} bpm, states {', '.join(f'{b:g}' for b in bad)}")
    return Verdict(AGREE, f"{task}: states ~{expected:g} bpm")


def transcript_of(record: Mapping[str, Any]) -> str | None:
    """The spoken words: metadata['transcript'] or the surrogate's body ('[00:00-00:03] words (...)')."""
    meta = record.get("metadata") or {}
    if meta.get("transcript"):
        return str(meta["transcript"])
    sur = record.get("surrogate") or ""
    if (record.get("domain") or "") not in ("speech", "instruction"):
        return None
    body = re.sub(r"\s*\((?:duration|[a-z ]+:)[^()]*\)\s*$", "", sur)
    body = re.sub(r"\[\d{2}:\d{2}-\d{2}:\d{2}[^\]]*\]", " ", body)
    body = body.strip()
    if not body or body.startswith("|"):
        return None
    return body


def check_transcript(expected: str, text: str, min_recall: float = 0.7) -> Verdict:
    want = [stem(w) for w in content_words(expected)] or [stem(w) for w in words(expected)]
    if not want:
        return Verdict(UNVERIFIABLE, "transcript has no words")
    have = {stem(w) for w in words(text)}
    hit = sum(w in have for w in want)
    recall = hit / len(want)
    need = 1.0 if len(want) <= 2 else min_recall
    if recall >= need:
        return Verdict(AGREE, f"transcript: {hit}/{len(want)} content words")
    return Verdict(DISAGREE, f"transcript: only {hit}/{len(want)} content words")


@register("transcript")
def _transcript(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    return check_transcript(str(meta["transcript"]), text)


@register("answer")
def _answer(task: str, text: str, meta: Mapping[str, Any]) -> Verdict:
    expected = str(meta["answer"]).strip()
    n = _to_int(expected) if expected.lstrip("-").isdigit() or expected.lower() in NUMBER_WORDS else None
    if n is not None:
        nums = [x for x in (_to_int(t) for t in _BARE_NUM_RX.findall(text.lower())) if x is not None]
        if not nums:
            return Verdict(DISAGREE, f"answer: expected {n}, no number stated")
        # The final number stated is the answer ("2 plus 3 is 5").
        if nums[-1] == n:
            return Verdict(AGREE, f"answer: states {n}")
        return Verdict(DISAGREE, f"answer: expected {n}, ends with {nums[-1]}")
    if _phrase_present(expected, text):
        return Verdict(AGREE, f"answer: states {expected!r}")
    return Verdict(DISAGREE, f"answer: expected {expected!r}, not stated")


# ---------------------------------------------------------------------------------------------- entry points
# Facts checked for contradictions whatever the task asked (they are cheap to state wrongly).
CONTRADICTION_KEYS = ("gender", "noise_colour", "sweep_direction", "mode", "instrument", "background_noise",
                      "beep_count", "key", "pitch_register", "tempo", "tempo_bpm", "frequency_hz")
_HZ_RX = re.compile(r"(\d+(?:\.\d+)?)\s*(k?hz|kilohertz|hertz)\b", re.IGNORECASE)
_BPM_RX = re.compile(r"(\d+(?:\.\d+)?)\s*(?:bpm|beats per minute)|\btempo of (?:about |around )?(\d+(?:\.\d+)?)",
                     re.IGNORECASE)


def _numbers_off(stated: list[float], expected: float, tol: float) -> list[float]:
    return [x for x in stated if abs(x - expected) > tol * expected]


def contradictions(text: str, meta: Mapping[str, Any], skip: str | None = None) -> list[str]:
    """Facts of `meta` that `text` states wrongly (a fact it does not mention is no contradiction)."""
    out = []
    for key in CONTRADICTION_KEYS:
        if key == skip or not meta.get(key):
            continue
        if key in CATEGORIES:
            wrong = mentioned_values(key, text) - {_norm_value(key, str(meta[key]))}
            if wrong:
                out.append(f"{key}: expected {meta[key]}, states {', '.join(sorted(wrong))}")
        elif key == "instrument":
            allowed = {stem(w) for w in words(str(meta[key]))}
            others = sorted({w for w in words(unquoted(text)) if w in INSTRUMENTS and stem(w) not in allowed})
            if others:
                out.append(f"instrument: expected {meta[key]}, names {', '.join(others)}")
        elif key == "beep_count":
            try:
                expected_n = int(str(meta[key]))
            except ValueError:
                continue
            wrong = sorted({n for n in stated_counts(text) if n != expected_n})
            if wrong:
                out.append(f"beep_count: expected {expected_n}, states {', '.join(map(str, wrong))}")
        elif key == "key":
            if not _key("key", text, meta).agrees and _KEY_RX.search(unquoted(text)):
                out.append(_key("key", text, meta).reason)
        elif key in ("frequency_hz", "tempo_bpm"):  # invented numbers ("a frequency of 220 Hz", "tempo of 144")
            try:
                expected_x = float(meta[key])
            except ValueError:
                continue
            if key == "frequency_hz":
                stated = [float(m.group(1)) * (1000 if m.group(2).lower().startswith("k") else 1)
                          for m in _HZ_RX.finditer(text)]
            else:
                stated = [float(m.group(1) or m.group(2)) for m in _BPM_RX.finditer(text)]
            wrong = _numbers_off(stated, expected_x, 0.1 if key == "frequency_hz" else 0.08)
            if wrong:
                out.append(f"{key}: expected {meta[key]}, states {', '.join(f'{w:g}' for w in wrong)}")
    return out


def facts_of(record: Mapping[str, Any]) -> dict[str, str]:
    """The checkable facts of a record: its metadata with a checker, plus its spoken words."""
    meta = {k: str(v) for k, v in (record.get("metadata") or {}).items() if v not in (None, "")}
    facts = {k: v for k, v in meta.items() if k in CHECKERS or k in CONTRADICTION_KEYS}
    tr = transcript_of(record)
    if tr and record.get("domain") != "instruction":
        facts["transcript"] = tr
    if record.get("domain") == "instruction":
        facts.pop("transcript", None)  # the question itself, not a fact about the audio to restate
    return facts


def verify(task: str | None, response: str | None, record: Mapping[str, Any],
           close_tag: str = "</think>") -> Verdict:
    """Check `response` (to a prompt about `task`) against the record's own facts."""
    if not response or not response.strip():
        return Verdict(DISAGREE, "empty response")
    text = answer_part(response, close_tag)
    facts = facts_of(record)
    task = task or "open"
    if record.get("domain") == "instruction" and task in ("instruction", "open"):
        if "answer" in facts:
            return CHECKERS["answer"]("answer", text, facts)
        bad = contradictions(text, facts)
        if bad:
            return Verdict(DISAGREE, "; ".join(bad))
        return Verdict(UNVERIFIABLE, "instruction without a known answer")
    if task in CHECKERS and task in facts:
        v = CHECKERS[task](task, text, facts)
        if v.status != AGREE:
            return v
        bad = contradictions(text, facts, skip=task)
        if bad:
            return Verdict(DISAGREE, f"{v.reason}; but " + "; ".join(bad))
        return v
    if task in CHECKERS:  # asks about a fact this record does not hold
        return Verdict(UNVERIFIABLE, f"record has no {task!r} fact")
    # open / describe: state at least one fact, contradict none.
    bad = contradictions(text, facts)
    if bad:
        return Verdict(DISAGREE, "; ".join(bad))
    stated = [k for k in facts if k not in ("transcript", "tempo_bpm")
              and k in CHECKERS and CHECKERS[k](k, text, facts).agrees]
    if "transcript" in facts and check_transcript(facts["transcript"], text, 0.5).agrees:
        stated.append("transcript")
    if stated:
        return Verdict(AGREE, f"{task}: states {', '.join(sorted(stated))}; no contradiction")
    if not facts:
        return Verdict(UNVERIFIABLE, f"{task}: record holds no checkable fact")
    return Verdict(UNVERIFIABLE, f"{task}: states none of {', '.join(sorted(facts))}")
