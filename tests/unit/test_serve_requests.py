"""The ALM endpoint's request parsing (no Ray): audio as clients encode it, conversations, refusals."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf

from ralm.model.chat import Dialogue
from ralm.serve.alm_app import RequestError, parse_request


@pytest.fixture(scope="module")
def wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).normal(size=16002).astype(np.float32) * 0.1, 16000, format="WAV")
    return buf.getvalue()  # 32048 bytes: base64 with one padding character


def _request(*messages: dict, **options) -> dict:
    return {"model": "m", "messages": list(messages), **options}


def _user(text: str | None = None, data: str | None = None) -> dict:
    parts = ([{"type": "text", "text": text}] if text is not None else []) + (
        [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}] if data is not None else [])
    return {"role": "user", "content": parts}


def test_audio_as_clients_encode_it(wav: bytes):
    std = base64.b64encode(wav).decode()
    assert std.endswith("=") and not std.endswith("==")
    for data in (std, f"data:audio/wav;base64,{std}", std.rstrip("="), base64.urlsafe_b64encode(wav).decode(),
                 base64.encodebytes(wav).decode(),  # wrapped at 76 columns, as `base64 clip.wav` prints it
                 " " + std + "\n"):
        assert parse_request(_request(_user("Q?", data)), 10**7, 64).audio == wav
    for bad in ("!!!not base64!!!", "QUJD=QUJD", ""):
        with pytest.raises(RequestError, match="base64|empty") as err:
            parse_request(_request(_user("Q?", bad)), 10**7, 64)
        assert err.value.status == 400


def test_a_conversation_about_the_clip(wav: bytes):
    data = base64.b64encode(wav).decode()
    one = parse_request(_request(_user("Q1", data)), 10**7, 64)
    assert one.question == "Q1"  # a single question stays a plain string, laid out as in training
    assert parse_request(_request(_user(None, data)), 10**7, 64).question == "Describe the audio."
    talk = parse_request(_request({"role": "system", "content": "Be brief."}, _user("Q1", data),
                                  {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                                  {"role": "user", "content": "Q2"}), 10**7, 64)
    assert talk.system == "Be brief." and talk.audio == wav
    assert talk.question == Dialogue((("user", "Q1"), ("assistant", "A1"), ("user", "Q2")), audio_turn=0)
    later = parse_request(_request({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                   _user(None, data)), 10**7, 64)
    assert later.question == Dialogue((("user", "Hi"), ("assistant", "Hello"), ("user", "Describe the audio.")), 2)
    text_only = parse_request(_request({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                       {"role": "user", "content": "And?"}), 10**7, 64)
    assert text_only.audio is None and len(text_only.question.turns) == 3
    for messages, match in [((_user("Q1", data), {"role": "assistant", "content": "A1"}), "user first and last"),
                            (({"role": "assistant", "content": "A"}, _user("Q")), "user first and last"),
                            ((_user("Q1", data), {"role": "tool", "content": "{}"}, _user("Q2")), "user first and last"),
                            ((_user("Q1", data), {"role": "assistant", "content": None}, _user("Q2")), "must be text"),
                            ((_user("Q1", data), {"role": "assistant", "content": "A"}, _user("Q2", data)),
                             "at most one audio"),
                            ((_user(""), {"role": "assistant", "content": ""}, _user("")), "neither text nor audio")]:
        with pytest.raises(RequestError, match=match):
            parse_request(_request(*messages), 10**7, 64)
