"""The encoders' feature cache: keyed by audio content, bounded by bytes, least recently used out first."""

from __future__ import annotations

import numpy as np

from ralm.encoders.cache import FeatureCache, audio_key


def _feats(n_floats: int, value: float = 0.0) -> list[dict[str, np.ndarray]]:
    return [{"whisper": np.full(n_floats, value, dtype=np.float32)}]


def test_the_key_is_the_content_and_the_rate():
    wav = np.sin(np.arange(1600, dtype=np.float32))
    assert audio_key(wav, 16000) == audio_key(wav.copy(), 16000)  # another array, the same samples
    assert audio_key(wav, 16000) == audio_key(wav.astype(np.float64), 16000)  # compared as float32
    assert audio_key(wav, 16000) != audio_key(wav, 22050)
    changed = wav.copy()
    changed[800] += 1e-3
    assert audio_key(wav, 16000) != audio_key(changed, 16000)
    assert audio_key(wav, 16000) != audio_key(wav[:-1], 16000)


def test_least_recently_used_entries_leave_first_and_the_budget_holds():
    cache = FeatureCache(max_bytes=3 * 400)  # three entries of 100 float32
    keys = [audio_key(np.full(10, i, dtype=np.float32), 16000) for i in range(4)]
    for i, k in enumerate(keys[:3]):
        cache.put(k, _feats(100, i))
    assert cache.get(keys[0])[0]["whisper"][0] == 0  # now the most recent
    cache.put(keys[3], _feats(100, 3))
    assert cache.get(keys[1]) is None  # the least recently used one went
    assert [cache.get(k)[0]["whisper"][0] for k in (keys[0], keys[2], keys[3])] == [0, 2, 3]
    assert cache.bytes == 1200 and len(cache) == 3
    cache.put(keys[0], _feats(200, 9))  # replacing an entry counts its new size, not both
    assert cache.bytes <= 1200 and cache.get(keys[0])[0]["whisper"][0] == 9
    assert cache.stats()["hits"] == 5 and cache.stats()["misses"] == 1


def test_an_entry_over_the_budget_or_a_zero_budget_keeps_nothing():
    key = audio_key(np.zeros(10, dtype=np.float32), 16000)
    cache = FeatureCache(max_bytes=100)
    cache.put(key, _feats(100))
    assert cache.get(key) is None and cache.bytes == 0
    off = FeatureCache(0)
    off.put(key, _feats(1))
    assert off.get(key) is None and len(off) == 0
