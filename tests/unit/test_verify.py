"""The metadata verifier: right answers agree, the tiny model's typical hallucinations disagree."""

from __future__ import annotations

import pytest

from ralm.selfgen.fallback import grounded_answer
from ralm.selfgen.leak import has_leak
from ralm.selfgen.verify import AGREE, DISAGREE, UNVERIFIABLE, transcript_of, verify


def rec(domain: str, surrogate: str = "", **meta: str) -> dict:
    return {"id": "x", "clip_id": "x", "domain": domain, "surrogate": surrogate, "metadata": meta}


FEMALE = rec("speech", "[00:00-00:03] The quick brown fox jumps over the lazy dog (duration: 3s, gender: female)",
             gender="female", speaking_rate="slow")
BEEPS = rec("sound", "[00:00-00:02] |beeps| (duration: 2s)", label="beeps", beep_count="3", pitch_register="high")
NOISE = rec("sound", "", label="pink noise", noise_colour="pink")
PIANO = rec("music", "", instrument="acoustic grand piano", key="C major", mode="major", tempo="fast",
            tempo_bpm="140")
QUESTION = rec("instruction", "", transcript="What is two plus three?", answer="5", gender="male")

CASES = [
    # (task, response, record, expected status)
    ("gender", "The speaker is a woman.", FEMALE, AGREE),
    ("gender", "<think>The voice is high.</think>She sounds female.", FEMALE, AGREE),
    ("gender", "The speaker is male.", FEMALE, DISAGREE),  # SmolLM2's actual mistake
    ("gender", "It could be male or female.", FEMALE, DISAGREE),  # hedging states both
    ("gender", "The voice is clear.", FEMALE, DISAGREE),  # does not answer
    ("gender", "She says \"he is late\", in a female voice.", FEMALE, AGREE),  # quoted words ignored
    ("beep_count", "I hear three beeps.", BEEPS, AGREE),
    ("beep_count", "There are 3 short beeps.", BEEPS, AGREE),
    ("beep_count", "Three.", BEEPS, AGREE),
    ("beep_count", "There are 2 beeps in 2 seconds.", BEEPS, DISAGREE),  # guessed from the duration
    ("beep_count", "Two beeps, then three beeps.", BEEPS, DISAGREE),
    ("label", "It sounds like a series of beeps.", BEEPS, AGREE),
    ("label", "It is a dog barking.", BEEPS, DISAGREE),
    ("noise_colour", "This is pink noise.", NOISE, AGREE),
    ("noise_colour", "This is white noise.", NOISE, DISAGREE),
    ("label", "Pink noise, or maybe white noise.", NOISE, DISAGREE),
    ("instrument", "A piano is playing.", PIANO, DISAGREE),  # 'acoustic grand' missing: strict phrase match
    ("instrument", "I hear an acoustic grand piano.", PIANO, AGREE),
    ("instrument", "An acoustic grand piano and a violin.", PIANO, DISAGREE),
    ("key", "The piece is in C major.", PIANO, AGREE),
    ("key", "It is in G major.", PIANO, DISAGREE),
    ("key", "It is in C minor.", PIANO, DISAGREE),
    ("tempo", "The tempo is fast.", PIANO, AGREE),
    ("tempo", "It is slow and calm.", PIANO, DISAGREE),
    ("tempo_bpm", "About 138 bpm.", PIANO, AGREE),
    ("tempo_bpm", "About 90 bpm.", PIANO, DISAGREE),
    ("pitch_register", "The beeps are high-pitched.", BEEPS, AGREE),
    ("pitch_register", "The beeps are low.", BEEPS, DISAGREE),
    ("transcript", "The speaker says the quick brown fox jumps over the lazy dog.", FEMALE, AGREE),
    ("transcript", "The speaker talks about a cat.", FEMALE, DISAGREE),
    ("describe", "A woman speaks about a quick brown fox.", FEMALE, AGREE),
    ("describe", "A man reads a sentence.", FEMALE, DISAGREE),  # contradicts gender
    ("describe", "A pleasant recording.", FEMALE, UNVERIFIABLE),
    ("describe", "The song 'Moonlight' by a famous band, played on a violin.", PIANO, DISAGREE),
    ("instruction", "Two plus three is 5.", QUESTION, AGREE),
    ("instruction", "The answer is six.", QUESTION, DISAGREE),
    ("gender", "", FEMALE, DISAGREE),
    ("gender", "She sounds female.", NOISE, UNVERIFIABLE),  # the record holds no gender
]


@pytest.mark.parametrize(("task", "response", "record", "status"), CASES)
def test_verify(task: str, response: str, record: dict, status: str) -> None:
    v = verify(task, response, record)
    assert v.status == status, v.reason
    assert v.reason


def test_transcript_from_surrogate() -> None:
    assert transcript_of(FEMALE) == "The quick brown fox jumps over the lazy dog"
    assert transcript_of(BEEPS) is None
    assert transcript_of(QUESTION) == "What is two plus three?"


@pytest.mark.parametrize("record", [FEMALE, BEEPS, NOISE, PIANO, QUESTION])
@pytest.mark.parametrize("task", ["gender", "beep_count", "label", "noise_colour", "instrument", "key",
                                  "tempo", "describe", "instruction", "transcript"])
def test_grounded_fallback_is_true_and_clean(task: str, record: dict) -> None:
    if (record["domain"] == "instruction") != (task == "instruction"):
        return  # instruction clips only get the instruction task, and only they do
    text = grounded_answer(task, record)
    if text is None:
        return
    assert not has_leak(text), text
    assert verify(task, text, record).status in (AGREE, UNVERIFIABLE)
    if task in (record["metadata"]) or task == "describe":
        assert verify(task, text, record).status == AGREE, text


TONE = rec("sound", "", label="tone", pitch_register="low", frequency_hz="110")
ORGAN = rec("music", "", instrument="church organ", key="D major", tempo="fast", tempo_bpm="150")


@pytest.mark.parametrize(("task", "response", "record", "status"), [
    # hallucinations seen from SmolLM2-135M on the demo corpus
    ("label", "A steady low-pitched tone with a high-pitched tone on top.", TONE, DISAGREE),
    ("label", "A low tone with a frequency of 220 Hz.", TONE, DISAGREE),
    ("label", "A low tone at about 110 Hz.", TONE, AGREE),
    ("tempo", "An extremely fast piece, with a tempo of 96.", ORGAN, DISAGREE),
    ("tempo", "A fast piece at 148 bpm.", ORGAN, AGREE),
])
def test_invented_details_disagree(task: str, response: str, record: dict, status: str) -> None:
    v = verify(task, response, record)
    assert v.status == status, v.reason
