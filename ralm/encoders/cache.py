"""The frozen encoders' output for the clips seen last, keyed by the audio's content.

A conversation about a clip sends the clip again with every follow-up (`ralm chat`, an OpenAI client's
next turn); the eval's shuffled-audio control plays each clip a second time under another item. The
encoders are frozen, so the same samples at the same rate always give the same features: the cache
answers those repeats without a forward pass. Bounded by bytes, least recently used out first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np


def audio_key(wav: np.ndarray, sr: int) -> tuple[int, int, bytes]:
    """(rate, samples, content digest): two clips share a key only if they hold the same samples."""
    data = np.ascontiguousarray(wav, dtype=np.float32)
    return int(sr), int(data.size), hashlib.blake2b(data.view(np.uint8), digest_size=20).digest()


def nbytes(value: Any) -> int:
    """Bytes held by a (nested list/dict of) numpy array(s)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return 0


class FeatureCache:
    """An LRU map audio key -> features, holding at most `max_bytes` of arrays (0 turns it off). An entry
    larger than the whole budget is not kept. Safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple[int, int, bytes], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int, bytes]) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple[int, int, bytes], value: Any) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._items.popitem(last=False)
                self.bytes -= freed

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}
