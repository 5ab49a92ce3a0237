import numpy as np
import pytest
import soundfile as sf

from ralm.audio import AudioError, decode, load_audio, probe, resample, validate


def test_decode_resample_and_mono(tmp_path):
    sr = 22050
    t = np.arange(sr) / sr
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], axis=1) * 0.5
    path = tmp_path / "s.flac"
    sf.write(str(path), stereo, sr)
    wav, got_sr = decode(str(path))
    assert got_sr == sr and wav.ndim == 1 and len(wav) == sr
    out = load_audio(str(path), 16000)
    assert abs(len(out) - 16000) <= 1 and out.dtype == np.float32
    # Resampling keeps the tone: the spectrum peaks at 300 Hz.
    spec = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spec) * 16000 / len(out) - 300) < 3


def test_offset_and_duration(tmp_path):
    sr = 16000
    ramp = np.linspace(-0.5, 0.5, 2 * sr, dtype=np.float32)
    sf.write(str(tmp_path / "r.wav"), ramp, sr, subtype="FLOAT")
    seg, _ = decode(str(tmp_path / "r.wav"), offset_s=0.5, duration_s=0.25)
    assert len(seg) == 4000 and seg[0] == pytest.approx(ramp[8000])


def test_probe_reports_rate_and_length(write_wav):
    info = probe(str(write_wav("a.wav", seconds=1.5, sr=8000)))
    assert info.sample_rate == 8000 and info.duration_s == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"RIFF\x00\x00junkjunkjunk" * 40), "corrupt"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError) as e:
        probe(str(path))
        decode(str(path))
    assert e.value.reason == reason


def test_undecodable_file_message_is_readable_and_repeatable(tmp_path):
    """The reject's detail names the file and what each decoder said, without an in-memory buffer's
    address or a C++ source line: the same file gives the same row on a rerun."""
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    details = []
    for _ in range(2):
        with pytest.raises(AudioError) as e:
            decode(str(path))
        details.append(e.value.detail)
    assert e.value.reason == "corrupt"
    assert details[0] == details[1]
    assert str(path) in details[0] and "soundfile:" in details[0] and "ffmpeg:" in details[0]
    assert " at 0x" not in details[0] and ".cpp:" not in details[0]


def test_missing_file():
    with pytest.raises(AudioError) as e:
        decode("/nonexistent/x.wav")
    assert e.value.reason == "missing"


def test_validate_limits():
    sr = 16000
    ok = 0.1 * np.ones(sr, dtype=np.float32)
    assert validate(ok, sr, min_seconds=0.5, max_seconds=2, silence_dbfs=-60) == pytest.approx(1.0)
    cases = [(np.zeros(sr, np.float32), "silent"), (ok[: sr // 4], "too_short"), (np.tile(ok, 3), "too_long"),
             (np.array([], np.float32), "empty"), (np.full(sr, np.nan, np.float32), "corrupt")]
    for wav, reason in cases:
        with pytest.raises(AudioError) as e:
            validate(wav, sr, min_seconds=0.5, max_seconds=2, silence_dbfs=-60)
        assert e.value.reason == reason


def test_too_large_file_refused_unread(write_wav):
    path = write_wav("big.wav", seconds=2)
    with pytest.raises(AudioError) as e:
        probe(str(path), max_file_mb=0.01)
    assert e.value.reason == "too_large"


def test_resample_identity():
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert resample(x, 16000, 16000) is x or np.array_equal(resample(x, 16000, 16000), x)


def test_a_store_that_cannot_be_read_is_an_error_not_a_reject(dead_store, tmp_path):
    """A clip whose store is down is not a bad clip: no reject row (a rerun would skip it for good); the
    Ray task marks it unreachable, for the driver to stop the stage, and the message says where to look."""
    from ralm import storage
    from ralm.corpus.build import check_clip
    from ralm.features.pipeline import decode_batch

    with pytest.raises(storage.StorageError, match=r"cannot read s3://bucket/a.wav: .*s3_endpoint_url"):
        probe("s3://bucket/a.wav")
    cfg = {"max_file_mb": 10, "max_seconds": 60, "min_seconds": 0.1, "silence_dbfs": -60, "seed": 0}
    clip = {"id": "a", "source": "s", "audio_uri": "s3://bucket/a.wav", "offset_s": 0.0, "duration_s": None,
            "segments": None, "transcript": None, "caption": None, "metadata": {}, "domain": "sound", "split": "train"}
    assert set(check_clip(clip, cfg)) == {"unreachable"}
    batch = {"clip_id": np.array(["a"], dtype=object), "audio_uri": np.array(["s3://bucket/a.wav"], dtype=object),
             "offset_s": np.array([0.0]), "duration_s": np.array([np.nan])}
    out = decode_batch(batch, [16000])
    assert list(out["error"]) == [storage.UNREACHABLE] and "EndpointConnectionError" in out["detail"][0]
    # The same clip missing from a local disk is the clip's problem: a reject with its reason.
    local = check_clip(clip | {"audio_uri": str(tmp_path / "gone.wav")}, cfg)
    assert local["reject"]["reason"] == "missing"
