"""The offline demo corpus: counts, contract, real decodable audio whose facts are true, determinism.

One synthesis for the module (~10-15 s of CPU on 2 cores); the determinism check re-renders a fifth of it.
The fact checks measure the audio itself (beep onsets, FFT peaks, spectral slope, F0), so a wrong label
in the manifest fails a test.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ralm.corpus import demo

pytestmark = pytest.mark.skipif(demo.find_soundfont() is None or not all(
    demo.shutil.which(t) for t in demo.REQUIRED_TOOLS), reason="demo Debian packages not installed")

# The contract's metadata keys per domain (plus `num_speakers` on two-speaker dialogues).
SPEECH_KEYS = {"gender", "voice", "synthesizer", "speaking_rate", "language", "background_noise", "snr_db",
               "num_speakers"}
ALLOWED_KEYS = {
    "speech": SPEECH_KEYS,
    "instruction": SPEECH_KEYS | {"answer"},
    "sound": {"label", "noise_colour", "beep_count", "pitch_register", "frequency_hz", "sweep_direction", "category"},
    "music": {"instrument", "key", "mode", "tempo_bpm", "tempo", "pitch_register", "category"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("demo")
    manifest = demo.synthesize_demo(str(out), seed=0, progress=False)
    assert manifest == str(out / "manifest.jsonl")
    rows = [json.loads(line) for line in Path(manifest).read_text(encoding="utf-8").splitlines()]
    return out, rows


def _load(root: Path, row: dict) -> np.ndarray:
    x, sr = sf.read(str(root / row["audio"]), dtype="float32")
    assert sr == demo.SAMPLE_RATE and x.ndim == 1
    return x


def test_counts_split_and_contract(built):
    root, rows = built
    counts = Counter(r["domain"] for r in rows)
    assert len(rows) >= 300 and set(counts) == set(demo.DOMAINS)
    assert all(counts[d] >= demo.MIN_PER_DOMAIN for d in demo.DOMAINS), counts
    assert len({r["audio"] for r in rows}) == len(rows)
    for d in demo.DOMAINS:
        test = sum(r["split"] == "test" for r in rows if r["domain"] == d)
        assert 0.15 <= test / counts[d] <= 0.20, (d, test, counts[d])
    assert {r["split"] for r in rows} == {None, "test"}
    for r in rows:
        assert list(r) == ["audio", "domain", "transcript", "caption", "segments", "split", "metadata"]
        assert not os.path.isabs(r["audio"]) and r["audio"].startswith(r["domain"] + "/")
        meta = r["metadata"]
        assert meta and set(meta) <= ALLOWED_KEYS[r["domain"]], (r["audio"], set(meta) - ALLOWED_KEYS[r["domain"]])
        assert all(isinstance(v, str) and v for v in meta.values())
        if r["domain"] in ("speech", "instruction"):
            assert r["transcript"] and r["caption"] is None
        else:
            assert r["caption"] and r["transcript"] is None
    # mixtures, dialogues (with segments) and answers are present
    assert sum("background_noise" in r["metadata"] for r in rows) >= 9
    assert sum(bool(r["segments"]) for r in rows) >= 4
    assert sum("answer" in r["metadata"] for r in rows) >= 40


def test_facts_are_balanced(built):
    _, rows = built
    by = defaultdict(Counter)
    for r in rows:
        for k, v in r["metadata"].items():
            by[(r["domain"], k)][v] += 1
    for domain in ("speech", "instruction"):
        g = by[(domain, "gender")]
        assert min(g["male"], g["female"]) >= 0.7 * max(g["male"], g["female"]), (domain, g)
    assert set(by[("sound", "beep_count")]) == {"1", "2", "3", "4", "5"}
    assert len(set(by[("sound", "beep_count")].values())) == 1  # equal numbers
    assert len(set(by[("sound", "noise_colour")].values())) == 1 and len(by[("sound", "noise_colour")]) == 3
    assert set(by[("music", "pitch_register")]) == {"low", "middle", "high"}
    assert len(by[("music", "instrument")]) >= 8


def test_every_clip_decodes_within_limits(built):
    root, rows = built
    for r in rows:
        x = _load(root, r)
        seconds = len(x) / demo.SAMPLE_RATE
        assert demo.MIN_SECONDS - 0.01 <= seconds <= demo.MAX_SECONDS + 0.5, (r["audio"], seconds)
        assert np.isfinite(x).all() and np.abs(x).max() > 0.1, r["audio"]


def _rows(rows, **meta):
    return [r for r in rows if all(r["metadata"].get(k) == v for k, v in meta.items())]


def test_beep_counts_and_frequencies_are_true(built):
    root, rows = built
    beeps = [r for r in rows if "beep_count" in r["metadata"]]
    assert len(beeps) >= 15
    for r in beeps:
        x = _load(root, r)
        env = np.convolve(np.abs(x), np.ones(160) / 160, mode="same") > 0.1 * np.abs(x).max()
        onsets = int(np.sum(env[1:] & ~env[:-1])) + int(env[0])
        assert onsets == int(r["metadata"]["beep_count"]), r
        spec = np.abs(np.fft.rfft(x))
        peak = np.fft.rfftfreq(len(x), 1 / demo.SAMPLE_RATE)[spec.argmax()]
        assert abs(peak - float(r["metadata"]["frequency_hz"])) < 10, (r["audio"], peak)


def _slope(x: np.ndarray) -> float:
    """Spectral slope in dB/decade between 100 Hz and 4 kHz."""
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / demo.SAMPLE_RATE)
    bands = np.logspace(2, np.log10(4000), 12)
    p = [10 * np.log10(spec[(f >= lo) & (f < hi)].mean()) for lo, hi in zip(bands[:-1], bands[1:], strict=True)]
    return float(np.polyfit(np.log10(np.sqrt(bands[:-1] * bands[1:])), p, 1)[0])


def test_noise_colours_and_sweeps_are_true(built):
    root, rows = built
    expected = {"white": 0.0, "pink": -10.0, "brown": -20.0}  # dB per decade
    for colour, slope in expected.items():
        for r in _rows(rows, noise_colour=colour):
            assert abs(_slope(_load(root, r)) - slope) < 3.5, (r["audio"], colour)
    for r in rows:
        direction = r["metadata"].get("sweep_direction")
        if direction:
            x = _load(root, r)
            q = len(x) // 4
            zc = [np.sum(np.abs(np.diff(np.sign(seg))) > 0) for seg in (x[:q], x[-q:])]
            assert (zc[1] > zc[0]) == (direction == "rising"), r["audio"]


def _f0(x: np.ndarray, sr: int = 16000) -> float:
    """Median autocorrelation pitch of voiced frames."""
    fr, vals = int(0.04 * sr), []
    for s in range(0, len(x) - fr, int(0.01 * sr)):
        w = x[s:s + fr] * np.hanning(fr)
        if np.sqrt(np.mean(w**2)) < 0.02 * np.abs(x).max():
            continue
        ac = np.correlate(w, w, "full")[fr - 1:]
        lo, hi = sr // 400, sr // 60
        k = lo + int(np.argmax(ac[lo:hi]))
        if ac[k] > 0.4 * ac[0]:
            vals.append(sr / k)
    return float(np.median(vals))


def test_synthesized_voice_gender_is_true(built):
    root, rows = built
    checked = 0
    for r in rows:
        m = r["metadata"]
        if m.get("synthesizer") in ("espeak-ng", "flite") and "gender" in m and "background_noise" not in m:
            if checked % 3 == 0:  # a third of them keeps the test quick
                f0 = _f0(_load(root, r))
                assert (f0 > 150) == (m["gender"] == "female"), (r["audio"], m["voice"], f0)
            checked += 1
    assert checked >= 100


def test_speaking_rates_are_true(built):
    root, rows = built
    wps = defaultdict(list)  # words per second by (synthesizer, rate)
    for r in rows:
        m = r["metadata"]
        if m.get("synthesizer") in ("espeak-ng", "flite") and "speaking_rate" in m and "snr_db" not in m:
            seconds = sf.info(str(root / r["audio"])).duration
            wps[m["synthesizer"], m["speaking_rate"]].append(len(r["transcript"].split()) / seconds)
    for synth in ("espeak-ng", "flite"):
        slow, normal, fast = (np.mean(wps[synth, rate]) for rate in ("slow", "normal", "fast"))
        assert slow < 0.85 * normal and normal < 0.85 * fast, (synth, slow, normal, fast)


def test_mixture_snr_is_true(built):
    root, rows = built
    for r in _rows(rows, synthesizer="espeak-ng"):
        if "snr_db" not in r["metadata"]:
            continue
        x = _load(root, r).astype(np.float64)
        lead = x[: int(0.35 * demo.SAMPLE_RATE)][int(0.05 * demo.SAMPLE_RATE):]  # noise alone (ramp skipped)
        p_noise = np.mean(lead**2)
        p_total = np.mean(x[int(0.4 * demo.SAMPLE_RATE): -int(0.3 * demo.SAMPLE_RATE)] ** 2)
        snr = 10 * np.log10(max(p_total - p_noise, 1e-12) / p_noise)
        assert abs(snr - float(r["metadata"]["snr_db"])) < 3.0, (r["audio"], snr)


def test_deterministic_and_idempotent(built, tmp_path, monkeypatch):
    root, rows = built
    # Same seed -> the same plan (manifest rows, in order) and byte-identical audio. A full second build
    # costs as much as the first, so a fifth of the clips (and every dialogue) is rendered again.
    clips = demo.plan(0, 1)
    again = tmp_path / "again"
    env = demo.RenderEnv(str(tmp_path), demo.find_soundfont())
    for i, c in enumerate(clips):
        if i % 5 == 0 or c.kind == "dialogue":
            demo.render(c, str(again), env)
            first, second = (root / c.audio).read_bytes(), (again / c.audio).read_bytes()
            if first != second and "espeak" in c.audio:
                # espeak-ng's first render of this clip on a freshly set-up machine has twice come out slightly
                # off (correlation 0.998 once; every later render, in or out of ralm, identical; cause not
                # found): allow that, and only that, for espeak-ng clips: the same length, nearly the same wave.
                a, b = _load(root, {"audio": c.audio}), _load(again, {"audio": c.audio})
                assert len(a) == len(b) and np.corrcoef(a, b)[0, 1] > 0.99, c.audio
                continue
            assert second == first, c.audio
    assert [c.row() for c in clips] == rows  # every dialogue was rendered, so its segments are filled in
    # a finished build is returned as is: nothing is planned or rendered again
    manifest = root / "manifest.jsonl"
    mtime = os.path.getmtime(manifest)
    monkeypatch.setattr(demo, "plan", lambda *a, **k: pytest.fail("re-planned a finished build"))
    assert demo.synthesize_demo(str(root), seed=0, progress=False) == str(manifest)
    assert os.path.getmtime(manifest) == mtime
    assert not demo._is_done(str(root), seed=1, scale=1)  # another seed (or scale, or code) rebuilds


def test_other_seed_changes_the_plan():
    a, b = demo.plan(0, 1), demo.plan(1, 1)
    assert [c.row() for c in a] != [c.row() for c in b]
    assert [c.row() for c in a] == [c.row() for c in demo.plan(0, 1)]
    assert len(demo.plan(0, 2)) > 1.6 * len(a)


def test_missing_optional_sources_are_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(demo, "SOURCES", {k: (pkg, "/nonexistent/" + k) for k, (pkg, _) in demo.SOURCES.items()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = demo.plan(0, 1)
    assert any("sonic-pi-samples" in str(w.message) and "scripts/setup.sh" in str(w.message) for w in caught)
    counts = Counter(c.domain for c in clips)
    assert all(counts[d] >= demo.MIN_PER_DOMAIN for d in demo.DOMAINS), counts
    assert all(c.kind != "file" and c.kind != "concat" for c in clips)


def test_missing_debian_package_is_a_clear_error(monkeypatch):
    real = demo.shutil.which
    monkeypatch.setattr(demo.shutil, "which", lambda t: None if t == "fluidsynth" else real(t))
    with pytest.raises(demo.DemoAssetsError, match=r"fluidsynth.*scripts/setup\.sh"):
        demo.check_tools()


def test_midi_writer_is_a_valid_smf():
    data = demo.midi_file([[0.0, 1.0, 60, 100], [1.0, 1.0, 64, 100]], program=40, bpm=120)
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    assert int.from_bytes(data[18:22], "big") == len(data) - 22
    assert b"\xc0\x28" in data and data.endswith(b"\xff\x2f\x00")  # program 40 (violin), end of track


def test_the_recipe_interleaves_domains_so_a_limit_keeps_a_mix(built):
    from ralm.corpus.recipes.base import RawClip, get_recipe

    root, rows = built
    items = [i for i in get_recipe("demo").scan(str(root)) if isinstance(i, RawClip)]
    assert len(items) == len(rows)
    assert {i.domain for i in items[:8]} == set(demo.DOMAINS)  # the first 8 clips already cover every domain
    assert Counter(i.domain for i in items) == Counter(r["domain"] for r in rows)
