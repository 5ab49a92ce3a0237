"""The lexical leak detector on text-perception phrasing (positives) and ordinary hearing language."""

from __future__ import annotations

import pytest

from ralm.selfgen.leak import find_leaks, has_leak, leak_summary

LEAKY = [
    "The description says it is a bell.",
    "According to the transcript, the speaker talks about rain.",
    "The caption reads |dog barking|.",
    "Based on the metadata, the voice is female.",
    "The audio between <start_audio> and <end_audio> contains speech.",
    "The tags indicate a piano.",
    "As mentioned, the sound is white noise.",
    "The information provided shows three beeps.",
    "The gender is given as female.",
    "The instrument listed is a violin.",
    "From [00:00-00:03] the speaker says hello.",
    "The clip (duration: 3s, label: bell) is a bell.",
    "Its key: C major, so the piece is happy.",
    "I can read that it is a trumpet.",
    "The text says the tempo is fast.",
    "The given text describes a dog.",
    "The sound is labelled as a phone ringing.",
    "This is a steady high tone with a label of tone.",
    "The pace is described as normal.",
    "It lasts 00:00-00:04 and is a sweep.",
    "The noise_colour is pink.",
]
CLEAN = [
    "I hear a bell ringing twice.",
    "The speaker sounds female and says hello.",
    "It sounds like a piano playing in C major.",
    "Each note is held for a given number of beats.",  # "a given ..." is ordinary English
    "Given that the pitch rises, this is a rising sweep.",
    "It is calm, provided that you like slow music.",
    "The speaker mentions the weather in London.",  # a person mentions: hearing speech
    "She says \"please read the description\" in a clear voice.",  # quoted spoken words
    "The tempo is fast and the mood is bright.",
    "Three high beeps, then silence.",
    "The clip lasts about three seconds.",
    "This can be described as a bright, ringing tone.",
    "A song from a famous record label.",
]


@pytest.mark.parametrize("text", LEAKY)
def test_leaky_texts_are_flagged(text: str) -> None:
    leaks = find_leaks(text)
    assert leaks, text
    for lk in leaks:  # spans point at the matched text
        assert text[lk.start:lk.end] == lk.text


@pytest.mark.parametrize("text", CLEAN)
def test_hearing_language_is_clean(text: str) -> None:
    assert not has_leak(text), leak_summary(text)


def test_spans_kinds_and_summary() -> None:
    text = "The transcript at [00:00-00:02] mentions <start_audio>."
    kinds = [lk.kind for lk in find_leaks(text)]
    assert kinds == ["text_word", "timestamp", "text_verb", "markup"]
    assert "text_word:transcript" in leak_summary(text)
    assert find_leaks("") == [] and find_leaks(None) == []
