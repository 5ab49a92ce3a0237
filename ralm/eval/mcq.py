"""The demo's held-out `test` split -> an MMAU-format multiple-choice file.

Each question asks about one ORIGINAL fact of a clip (its metadata, or a word of its transcript): one
correct choice and up to 3 distractors drawn from the values that fact takes elsewhere in the corpus plus
a fixed vocabulary. Binary or 3-valued facts (gender, sweep direction, tempo...) keep their natural number
of choices, so chance is honest (reported per item as 1/len(choices)). Everything is seeded by the clip id:
the same corpus gives the same file.

The output is MMAU's item shape (id, audio_id, question, choices, answer, dataset, task, split, category,
sub-category, difficulty) plus `domain` (ralm's 4 domains); `task` maps `instruction` to `speech` so the
official MMAU `evaluation.py` scores the file unchanged.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ralm import storage
from ralm.eval.scoring import tokens

# Words too common to identify a clip (the spoken-word question picks a content word).
_STOPWORDS = frozenset(
    """a an the and or but if then than that this these those there their they them he she his her him it its
    is are was were be been being am do does did done have has had of to in on at by for with from as into
    onto over under about after before again not no yes you your we our us i me my what which who whom whose
    when where why how can could would should will shall may might must just very also too so such some any
    each every all both few more most other only own same out up down off here now one two three four five
    six seven eight nine ten""".split()
)

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z']+")


@dataclass(frozen=True)
class Fact:
    """One kind of question: where its answer comes from, how it is asked, what else it could have been."""

    name: str
    questions: tuple[str, ...]
    vocabulary: tuple[str, ...] = ()  # fixed distractor pool, added to the values seen in the corpus
    difficulty: str = "medium"
    render: Callable[[str], str] = str  # metadata value -> choice text
    extract: Callable[[Mapping[str, Any]], list[str]] | None = None  # record -> candidate answers

    def answers(self, record: Mapping[str, Any]) -> list[str]:
        if self.extract is not None:
            return self.extract(record)
        value = (record.get("metadata") or {}).get(self.name)
        return [self.render(str(value))] if value not in (None, "") else []


FACTS: dict[str, Fact] = {}


def register_fact(fact: Fact) -> Fact:
    FACTS[fact.name] = fact
    return fact


def content_words(text: str | None) -> list[str]:
    seen: dict[str, None] = {}
    for w in _WORD_RE.findall(text or ""):
        lw = w.lower().strip("'")
        if len(lw) >= 4 and lw not in _STOPWORDS:
            seen.setdefault(lw, None)
    return list(seen)


def _beeps(v: str) -> str:
    return f"{v} beep" if v.strip() == "1" else f"{v} beeps"


register_fact(Fact("gender", ("Is the speaker male or female?", "What is the gender of the voice you hear?"),
                   ("male", "female"), "easy"))
register_fact(Fact("transcript_word", ("Which of these words is spoken in the recording?",
                                       "Which word do you hear the speaker say?"),
                   difficulty="medium", extract=lambda r: content_words(r.get("transcript")
                                                                       or (r.get("metadata") or {}).get("transcript"))))
register_fact(Fact("label", ("What sound is this?", "Which sound do you hear in this clip?"),
                   ("bell", "phone ringing", "camera shutter", "white noise", "beeps", "rising sweep",
                    "door knock", "dog barking", "applause", "water running"), "easy"))
register_fact(Fact("noise_colour", ("What colour of noise is this?", "Is this white, pink or brown noise?"),
                   ("white", "pink", "brown"), "medium"))
register_fact(Fact("beep_count", ("How many beeps are there?", "How many beeps do you hear?"),
                   tuple(_beeps(str(i)) for i in range(1, 6)), "hard", render=_beeps))
register_fact(Fact("pitch_register", ("Is the pitch low, middle or high?", "How high is the pitch of this sound?"),
                   ("low", "middle", "high"), "medium"))
register_fact(Fact("sweep_direction", ("Does the tone rise or fall in pitch?",), ("rising", "falling"), "medium"))
register_fact(Fact("instrument", ("Which instrument is playing?", "What instrument do you hear?"),
                   ("piano", "violin", "flute", "trumpet", "acoustic guitar", "church organ", "cello",
                    "clarinet", "harp", "xylophone"), "easy"))
register_fact(Fact("tempo", ("Is the tempo slow, moderate or fast?", "How fast is this music?"),
                   ("slow", "moderate", "fast"), "hard"))
register_fact(Fact("background_noise", ("What kind of noise is heard behind the voice?",),
                   ("white noise", "pink noise", "brown noise"), "medium"))
register_fact(Fact("speaking_rate", ("Is the person speaking slowly, at a normal pace, or fast?",),
                   ("slow", "normal", "fast"), "hard"))
register_fact(Fact("mode", ("Is this music in a major or a minor key?",), ("major", "minor"), "hard"))
register_fact(Fact("answer", ("What is the correct answer to the spoken question?",), difficulty="hard"))

# Facts a CPU demo can plausibly hear (mode: Whisper tiny does not hear harmony; measured at chance).
DEFAULT_FACTS = ("gender", "transcript_word", "label", "noise_colour", "beep_count", "pitch_register",
                 "sweep_direction", "instrument", "tempo", "background_noise", "answer")

MMAU_TASK = {"speech": "speech", "instruction": "speech", "sound": "sound", "music": "music"}


def _numeric_neighbours(value: str) -> list[str]:
    try:
        n = int(value.strip())
    except ValueError:
        return []
    return [str(n + d) for d in (-3, -2, -1, 1, 2, 3, 10, -10) if n + d >= 0]


def value_pools(records: Iterable[Mapping[str, Any]], facts: Sequence[str]) -> dict[str, list[str]]:
    """Every value each fact takes across the corpus (train clips included): realistic distractors."""
    pools: dict[str, dict[str, None]] = defaultdict(dict)
    for r in records:
        for name in facts:
            for a in FACTS[name].answers(r):
                pools[name].setdefault(a, None)
    return {k: sorted(v) for k, v in pools.items()}


def distractors(correct: str, candidates: Iterable[str], k: int, rng: random.Random,
                exclude: Iterable[str] = ()) -> list[str]:
    """Up to k candidates that cannot be confused with `correct` by the word-token scorer."""
    ct = tokens(correct)
    banned = {frozenset(tokens(e)) for e in exclude} | {frozenset(ct)}
    pool = sorted({c for c in candidates if tokens(c) and frozenset(tokens(c)) not in banned})
    rng.shuffle(pool)
    out: list[str] = []
    for c in pool:
        if all(tokens(c) != tokens(o) for o in out):
            out.append(c)
        if len(out) == k:
            break
    return out


def make_question(record: Mapping[str, Any], fact_name: str, pools: Mapping[str, list[str]], seed: int = 0,
                  n_choices: int = 4) -> dict[str, Any] | None:
    fact = FACTS[fact_name]
    clip = str(record.get("clip_id") or record["id"])
    rng = random.Random(f"{seed}:{clip}:{fact_name}")
    answers = fact.answers(record)
    if not answers:
        return None
    correct = rng.choice(answers)
    candidates = list(fact.vocabulary) + list(pools.get(fact_name, ()))
    if fact_name == "answer":
        candidates += _numeric_neighbours(correct)
    # The spoken-word question must not offer another word of the same transcript.
    wrong = distractors(correct, candidates, n_choices - 1, rng, exclude=answers if fact.extract else ())
    if not wrong:
        return None
    choices = [correct, *wrong]
    rng.shuffle(choices)
    domain = str(record.get("domain") or "")
    return {
        "id": f"{clip}/{fact_name}",
        "audio_id": record["audio_uri"],
        "question": rng.choice(fact.questions),
        "choices": choices,
        "answer": correct,
        "dataset": "ralm-demo",
        "task": MMAU_TASK.get(domain, "sound"),
        "split": "test-mini",
        "category": fact_name,
        "sub-category": domain,
        "difficulty": fact.difficulty,
        "domain": domain,
        "clip_id": clip,
    }


def build_demo_mcq(test_records: Iterable[Mapping[str, Any]], out_uri: str | None = None, *,
                   pool_records: Iterable[Mapping[str, Any]] | None = None,
                   facts: Sequence[str] = DEFAULT_FACTS, per_clip: int = 2, n_choices: int = 4,
                   seed: int = 0) -> list[dict[str, Any]]:
    """MCQ items for the held-out clips (at most `per_clip` facts each, chosen per clip by seed).

    `pool_records` (default: the test records) supply distractor values; pass the whole corpus.
    Writes the JSON list to `out_uri` when given.
    """
    unknown = [f for f in facts if f not in FACTS]
    if unknown:
        raise KeyError(f"unknown MCQ facts {unknown}; known: {sorted(FACTS)}")
    tests = list(test_records)
    pools = value_pools(pool_records if pool_records is not None else tests, facts)
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in sorted(tests, key=lambda r: str(r.get("clip_id") or r["id"])):
        clip = str(r.get("clip_id") or r["id"])
        if clip in seen:
            continue
        seen.add(clip)
        made = [q for q in (make_question(r, f, pools, seed, n_choices) for f in facts) if q is not None]
        random.Random(f"{seed}:{clip}:pick").shuffle(made)
        items.extend(made[:per_clip])
    if out_uri:
        storage.write_json(out_uri, items)
    return items


def build_demo_mcq_from_corpus(corpus_stage_uri: str, out_uri: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Read `corpus/data`, take the `test` split, write the MCQ file (distractors from the whole corpus)."""
    from ralm import records

    rows = records.read_records(records.data_uri(corpus_stage_uri),
                                columns=["id", "clip_id", "split", "domain", "audio_uri", "metadata", "surrogate"])
    tests = [r for r in rows if r.get("split") == "test"]
    if not tests:
        raise ValueError(f"{corpus_stage_uri} has no test-split clips to build the held-out MCQ set from")
    return build_demo_mcq(tests, out_uri, pool_records=rows, **kwargs)
