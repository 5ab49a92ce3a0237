"""Lexical leak detector: does a target reveal that its author *read* a text instead of *hearing* audio?

A self-generated response was written from the textual surrogate, so it tends to say "the transcript
says...", "as mentioned in the description", "(duration: 3s)" or "[00:00-00:03]". The ALM trained on such a
target would claim to read text it never sees. `find_leaks` returns every matched span with its kind.

Decisions on ambiguous words (documented because they trade recall for precision):
- "given" / "provided" leak when they refer to an input ("the given text", "the information provided",
  "is given", "given in the clip"); "a given note", "any given moment", "given that ..." and "provided
  that ..." are ordinary English and do not leak.
- "mentions" / "states" / "says" leak when a text is their subject ("the description mentions", "as
  mentioned"), not when a person is ("the speaker mentions the weather" is hearing speech).
- "label(s)" always leaks (an annotation: "a label of tone", "labelled as") except in "record label";
  "tag(s)" leaks as tags ("the tags", "<start_audio> tag"). "is described as" leaks ("the pace is
  described as normal"); "can be described as" is ordinary English.
- Words inside double quotes are kept: quoting the spoken words ("she says \"hello\"") is legitimate, and
  quoted words that happen to be "description" would be rare; leak markup (<start_audio>) is found anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Subjects that make "mentions / says / states" a report of *hearing* a person.
_PERSON = r"(?:speaker|speakers|narrator|voice|man|woman|boy|girl|person|someone|singer|he|she|they|i)"

# (kind, pattern). Patterns are case-insensitive; word boundaries where words are matched.
_PATTERNS: list[tuple[str, str]] = [
    # markup and formats of the surrogate itself
    ("markup", r"<\s*/?\s*(?:start|end)_audio\s*>|\b(?:start|end)_audio\b"),
    ("timestamp", r"\[\s*\d{1,2}:\d{2}\s*[-\u2013]\s*\d{1,2}:\d{2}[^\]]*\]"),
    ("timestamp", r"\b\d{1,2}:\d{2}\s*[-\u2013]\s*\d{1,2}:\d{2}\b"),
    ("field", r"\(\s*duration\s*:|\bduration\s*:\s*\d"),
    ("field", r"\b(?:gender|label|noise[ _]colou?r|beep[ _]count|pitch[ _]register|tempo[ _]bpm|"
              r"sweep[ _]direction|speaking[ _]rate|snr[ _]db|frequency[ _]hz|category|synthesizer|voice|"
              r"instrument|key|mode|tempo|language|background[ _]noise)\s*[:=]\s*\w"),
    ("field", r"\b(?:beep_count|pitch_register|noise_colou?r|tempo_bpm|sweep_direction|speaking_rate|"
              r"snr_db|frequency_hz|background_noise)\b"),
    ("caption_pipes", r"\|[^|\n]{1,80}\|"),
    # nouns that name a text input
    ("text_word", r"\b(?:descriptions?|transcripts?|transcriptions?|transcribed|captions?|"
                  r"captioned|metadata|meta-data|annotations?|annotated|surrogates?|textual|"
                  r"key-value|key/value)\b"),
    ("text_word", r"\b(?:the|these|its|audio|given|provided)\s+tags?\b|\btagged\b|\btags?\s+(?:say|says|show|"
                  r"indicate|indicates)\b|<[a-z_]+>\s*tags?\b"),
    ("text_word", r"(?<!record )\blabels?\b|\blabell?ed\b"),  # a "record label" is music talk
    ("text_word", r"\b(?:the|this|that|input|above|following)\s+(?:text|prompt|information|data|details|"
                  r"fields?|entry|entries|notes?|input)\b"),
    ("text_word", r"\b(?:text|it|description|transcript|caption|prompt|entry|data)\s+(?:says|reads|states|"
                  r"shows|indicates|lists|notes|specifies)\b"),
    ("text_word", r"\b(?:written|in writing|as described|described\s+(?:in|above|below|here))\b|"
                  r"\b(?:is|are|was|were|been)\s+described\b"),
    # verbs of reading / being told
    ("text_verb", r"\bi\s+(?:can\s+|could\s+)?(?:read|see|saw)\b|\bas\s+(?:i\s+)?(?:read|shown|seen|noted|"
                  r"indicated|specified|stated|listed)\b|\breading\s+(?:the|this)\b"),
    ("text_verb", r"\b(?:is|are|was|were|been|being|as|the|information|details|data|text|values?)\s+"
                  r"(?:provided|given|listed|specified|indicated|stated)\b"),
    ("text_verb", r"\b(?:provided|given|listed|specified|indicated|stated)\s+(?:text|description|"
                  r"information|data|details|metadata|transcript|caption|input|audio|clip|recording|"
                  r"values?|above|below|here|in|as|by)\b"),
    ("text_verb", r"\b(?:mentioned|mentions?|mentioning)\b"),
    ("text_verb", r"\b(?:listed|lists)\b"),
]
_COMPILED = [(kind, re.compile(p, re.IGNORECASE)) for kind, p in _PATTERNS]

# Person subjects in front of "mention(s|ed)" / "list(s|ed)" make it hearing, not reading.
_PERSON_BEFORE = re.compile(rf"\b{_PERSON}\b(?:\s+\w+){{0,2}}\s*$", re.IGNORECASE)
_PERSON_VERB = re.compile(r"^(?:mentioned|mentions?|mentioning|listed|lists)$", re.IGNORECASE)
_QUOTED = re.compile(r"\"[^\"\n]{0,400}\"|\u201c[^\u201d\n]{0,400}\u201d")


@dataclass(frozen=True)
class Leak:
    start: int
    end: int
    text: str
    kind: str


def _quoted_spans(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _QUOTED.finditer(text)]


def find_leaks(text: str | None) -> list[Leak]:
    """Every text-perception span in `text`, sorted, overlaps merged to the first (longest) match."""
    if not text:
        return []
    quoted = _quoted_spans(text)
    found: list[Leak] = []
    for kind, rx in _COMPILED:
        for m in rx.finditer(text):
            s, e = m.start(), m.end()
            if kind not in ("markup", "timestamp", "field", "caption_pipes") and any(
                qs <= s and e <= qe for qs, qe in quoted
            ):
                continue  # inside quoted spoken words
            if _PERSON_VERB.match(m.group(0)) and _PERSON_BEFORE.search(text[max(0, s - 40):s]):
                continue  # "the speaker mentions ..." is hearing speech
            found.append(Leak(s, e, m.group(0), kind))
    found.sort(key=lambda lk: (lk.start, -(lk.end - lk.start)))
    merged: list[Leak] = []
    for lk in found:
        if merged and lk.start < merged[-1].end:
            continue
        merged.append(lk)
    return merged


def has_leak(text: str | None) -> bool:
    return bool(find_leaks(text))


def leak_summary(text: str | None, limit: int = 5) -> str:
    """A short reason string: 'text_word:transcript; markup:<start_audio>'."""
    return "; ".join(f"{lk.kind}:{lk.text}" for lk in find_leaks(text)[:limit])
