"""MCQ prompts, answer parsing and the benchmarks' scoring rules.

The prompt lists numbered choices and asks for `<answer>N</answer>`; the chosen index maps back to the
choice text, which is what the official scorers see. Anything we cannot map to one choice is *unparsed*:
it counts as wrong and is reported as a rate — never replaced by a random guess.

Scoring rules (registered by name, selected by the benchmark):
- `string_match`: MMAU/MMAR semantics on lower-cased word tokens (`\\b\\w+\\b`): every token of the answer
  must be in the prediction, and the prediction may contain no token of another choice that the answer
  lacks. An empty prediction is wrong.
- `letter`: MMSU — the predicted choice letter (A-D) must be the gold letter.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJ"

DEFAULT_INSTRUCTION = (
    "Choose the correct option. Reply with the option's number inside answer tags, for example <answer>1</answer>."
)

_WORD = re.compile(r"\b\w+\b")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_OPEN_ANSWER = re.compile(r"<answer>(.*)$", re.IGNORECASE | re.DOTALL)
# "2", "(2)", "2." alone, or an enumerator with punctuation before text ("2. violin"; not "2 beeps").
_INDEX = re.compile(r"^\s*[\(\[]?\s*(\d+)\s*[\)\]\.:]?\s*$|^\s*[\(\[]?\s*(\d+)\s*[\)\]\.:]\s+\S")
_LETTER = re.compile(r"^\s*[\(\[]?\s*([A-J])\s*[\)\]\.:]?\s*$|^\s*[\(\[]?\s*([A-J])\s*[\)\]\.:]\s+\S")


def tokens(text: str | None) -> set[str]:
    return set(_WORD.findall(text.lower())) if text else set()


# ---------------------------------------------------------------------------------------------- prompt
def build_prompt(question: str, choices: Sequence[str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    lines = [question.strip(), "", "Choices:"]
    lines += [f"{i}. {c}" for i, c in enumerate(choices, start=1)]
    return "\n".join(lines + ["", instruction])


# ---------------------------------------------------------------------------------------------- parsing
def strip_thinking(output: str, close_tag: str = "</think>", thought_open: bool = False) -> str:
    """The part after the last closed thought; a thought that never closed leaves nothing to parse.

    `thought_open`: the chat template's generation prompt already opened the thought (reasoning models
    like Qwen3-Thinking), so a reply without the close tag is all thought — cut off before any answer.
    """
    if close_tag in output:
        return output.rsplit(close_tag, 1)[1]
    if thought_open or "<think>" in output:
        return ""
    return output


def _match_text(text: str, choices: Sequence[str]) -> int | None:
    """The one choice whose text `text` names (string_match semantics); None if zero or several do."""
    hits = [i for i, c in enumerate(choices) if string_match(c, text, choices)]
    return hits[0] if len(hits) == 1 else None


def _parse_span(span: str, choices: Sequence[str]) -> int | None:
    m = _INDEX.match(span)
    if m:
        idx = int(m.group(1) or m.group(2)) - 1
        if 0 <= idx < len(choices):
            return idx
        # Out of range as an option number, but maybe the value of a numeric choice ("<answer>18</answer>").
        same = [i for i, c in enumerate(choices) if c.strip() == str(idx + 1)]
        return same[0] if len(same) == 1 else None
    m = _LETTER.match(span)
    if m:
        idx = LETTERS.index(m.group(1) or m.group(2))
        return idx if idx < len(choices) else None
    return _match_text(span, choices)


def parse_choice(output: str | None, choices: Sequence[str], thought_open: bool = False) -> int | None:
    """0-based index of the chosen choice, or None when the output names no single choice.

    Looks at the last `<answer>...</answer>` (else an unclosed `<answer>` cut off by the token limit,
    else the whole reply): an option number ("2", "(2)", "2. violin"), a letter ("B", "B) violin") or
    text that names exactly one choice. Thinking (`<think>...</think>`) is ignored.
    """
    if not output:
        return None
    text = strip_thinking(output, thought_open=thought_open)
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        span = tagged[-1]
    else:
        m = _OPEN_ANSWER.search(text)
        span = m.group(1) if m else text
    return _parse_span(span, choices) if span.strip() else None


# ---------------------------------------------------------------------------------------------- scorers
def string_match(answer: str, prediction: str | None, choices: Sequence[str]) -> bool:
    """MMAU's official rule on word tokens (see module doc)."""
    pred = tokens(prediction)
    if not pred:
        return False
    gold = tokens(answer)
    wrong: set[str] = set()
    for c in choices:
        ct = tokens(c)
        if ct != gold:
            wrong |= ct - gold
    return gold.issubset(pred) and pred.isdisjoint(wrong)


Scorer = Callable[["ScoredItemInput"], bool]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return deco


@dataclass
class ScoredItemInput:
    choices: list[str]
    answer_index: int
    pred_index: int | None

    @property
    def answer(self) -> str:
        return self.choices[self.answer_index]

    @property
    def prediction_text(self) -> str:
        return "" if self.pred_index is None else self.choices[self.pred_index]


@register_scorer("string_match")
def _score_string_match(x: ScoredItemInput) -> bool:
    return string_match(x.answer, x.prediction_text, x.choices)


@register_scorer("letter")
def _score_letter(x: ScoredItemInput) -> bool:
    return x.pred_index is not None and LETTERS[x.pred_index] == LETTERS[x.answer_index]


def score_item(scorer: str, choices: Sequence[str], answer_index: int, pred_index: int | None) -> bool:
    if scorer not in SCORERS:
        raise KeyError(f"unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
    return SCORERS[scorer](ScoredItemInput(list(choices), answer_index, pred_index))


# ---------------------------------------------------------------------------------------------- aggregation
@dataclass
class Tally:
    correct: int = 0
    total: int = 0
    unparsed: int = 0
    chance: float = 0.0  # sum of 1/len(choices)

    def add(self, correct: bool, parsed: bool, n_choices: int) -> None:
        self.correct += int(correct)
        self.total += 1
        self.unparsed += int(not parsed)
        self.chance += 1.0 / max(n_choices, 1)

    def as_dict(self) -> dict[str, Any]:
        n = max(self.total, 1)
        return {
            "accuracy": self.correct / n if self.total else None,
            "correct": self.correct,
            "total": self.total,
            "unparsed": self.unparsed,
            "unparsed_rate": self.unparsed / n if self.total else None,
            "chance": self.chance / n if self.total else None,
        }


@dataclass
class Summary:
    overall: Tally = field(default_factory=Tally)
    groups: dict[str, dict[str, Tally]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Tally)))

    def as_dict(self) -> dict[str, Any]:
        out = self.overall.as_dict()
        for group, tallies in self.groups.items():
            out[f"by_{group}"] = {k: t.as_dict() for k, t in sorted(tallies.items())}
        return out


def summarize(rows: Iterable[dict[str, Any]], group_keys: Sequence[str] = ("domain", "category", "difficulty")) -> dict[str, Any]:
    """rows: dicts with `correct`, `pred_index`, `choices` and the group keys. Overall + per group."""
    s = Summary()
    for r in rows:
        parsed = r.get("pred_index") is not None
        n = len(r["choices"])
        s.overall.add(bool(r["correct"]), parsed, n)
        for g in group_keys:
            value = r.get(g)
            if value not in (None, ""):
                s.groups[g][str(value)].add(bool(r["correct"]), parsed, n)
    return s.as_dict()


def chance_level(choice_counts: Iterable[int]) -> float:
    counts = list(choice_counts)
    return sum(1.0 / c for c in counts) / len(counts) if counts else 0.0
