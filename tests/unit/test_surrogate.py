import pytest

from ralm.corpus.surrogate import Segment, format_surrogate, ordinal, timestamp


def test_single_speaker_transcript():
    s = format_surrogate(7.2, transcript="Hello there.", metadata={"gender": "female", "language": "english"})
    assert s == "[00:00-00:07] Hello there. (duration: 7.2s, gender: female, language: english)"


def test_caption_between_bars_and_stable_key_order():
    a = format_surrogate(5.0, caption="a dog barks", metadata={"zeta": "1", "label": "dog", "alpha": "x"})
    b = format_surrogate(5.0, caption="a dog barks", metadata={"alpha": "x", "label": "dog", "zeta": "1"})
    assert a == b == "[00:00-00:05] |a dog barks| (duration: 5s, label: dog, alpha: x, zeta: 1)"


def test_multi_speaker_segments_use_ordinals():
    segs = [Segment(0, 7, "Hi, how are you?", 1), Segment(7, 19.4, "Fine, thanks.", 2), Segment(19.4, 75, "Good.", 1)]
    s = format_surrogate(75, segments=segs)
    assert s == ("[00:00-00:07, the first speaker] Hi, how are you? [00:07-00:19, the second speaker] Fine, thanks. "
                 "[00:19-01:15, the first speaker] Good. (duration: 75s)")


def test_single_speaker_segments_have_no_speaker_label():
    s = format_surrogate(4, segments=[Segment(0, 2, "one", 1), Segment(2, 4, "two", 1)])
    assert s == "[00:00-00:02] one [00:02-00:04] two (duration: 4s)"


def test_hidden_and_empty_keys_are_left_out():
    s = format_surrogate(3, transcript="hi", metadata={"transcript": "hi", "answer": "4", "gender": "", "snr_db": "5"})
    assert s == "[00:00-00:03] hi (duration: 3s, snr db: 5)"


def test_helpers():
    assert [ordinal(i) for i in (1, 2, 3, 11, 21, 22, 23, 101)] == [
        "first", "second", "third", "eleventh", "21st", "22nd", "23rd", "101st"]
    assert timestamp(0) == "00:00" and timestamp(61) == "01:01" and timestamp(3599) == "59:59"
    with pytest.raises(ValueError):
        ordinal(0)
    with pytest.raises(ValueError):
        format_surrogate(1, transcript="a", caption="b")
