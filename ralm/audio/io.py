"""Decode (soundfile first; torchcodec/FFmpeg only for what soundfile can't read), mono, resample, validate.

Every failure is an `AudioError` with a short machine-readable `reason` (the rejects table's reason
column) and a human-readable message; a store that cannot be read at all is a `StorageError` instead.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from ralm import storage


class AudioError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _from_store(uri: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (FileNotFoundError, IsADirectoryError):
        raise AudioError("missing", f"{uri} does not exist") from None
    except Exception as e:
        if storage.is_remote(uri):  # the store, not the clip
            raise storage.unreachable(uri, e) from e
        if isinstance(e, PermissionError):  # one local file's mode: that file's problem
            raise AudioError("unreadable", f"{uri}: permission denied") from None
        raise


def _open_bytes(uri: str) -> bytes:
    return _from_store(uri, lambda: storage.read_bytes(uri))


def _size_bytes(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    return int(_from_store(uri, lambda: fs.size(path)))


def probe(uri: str, max_file_mb: float | None = None) -> AudioInfo:
    """Rate, length and channels without decoding the samples (falls back to a full decode)."""
    size = _size_bytes(uri)
    if size == 0:
        raise AudioError("empty", f"{uri} is an empty file (0 bytes)")
    if max_file_mb is not None and size > max_file_mb * 1024 * 1024:
        raise AudioError("too_large", f"{uri} is {size / 2**20:.1f} MB > limit {max_file_mb} MB")
    data = _open_bytes(uri) if storage.is_remote(uri) else None
    try:
        info = sf.info(io.BytesIO(data) if data is not None else storage.filesystem(uri)[1])
        return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))
    except Exception:
        wav, sr = decode(uri)
        return AudioInfo(sr, len(wav), 1)


def decode(uri: str, offset_s: float = 0.0, duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples at the file's own rate, and that rate."""
    raw = _open_bytes(uri)
    if len(raw) == 0:
        raise AudioError("empty", f"{uri} is an empty file (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            sr = f.samplerate
            start = int(round(offset_s * sr))
            if start:
                f.seek(min(start, f.frames))
            frames = -1 if duration_s is None else int(round(duration_s * sr))
            wav = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as sf_err:  # not a format libsndfile knows: try FFmpeg through torchcodec
        wav, sr = _decode_ffmpeg(raw, uri, sf_err)
        start = int(round(offset_s * sr))
        end = None if duration_s is None else start + int(round(duration_s * sr))
        wav = wav[start:end]
    mono = wav.mean(axis=1) if wav.ndim == 2 else wav
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


# Decoder messages name an in-memory buffer's address or a C++ source line; neither helps a user, and an
# address would make a rerun's reject row differ from the first run's.
_NOISE = (re.compile(r"Error opening <[^>]*>: "), re.compile(r"^[^,]*, \S+\.(?:cpp|cc|h):\d+, "))


def decoder_message(err: Exception) -> str:
    text = str(err).strip()
    for pattern in _NOISE:
        text = pattern.sub("", text)
    return text


def _decode_ffmpeg(raw: bytes, uri: str, sf_err: Exception) -> tuple[np.ndarray, int]:
    try:
        from torchcodec.decoders import AudioDecoder
    except Exception:
        raise AudioError("corrupt", f"{uri}: soundfile cannot decode it ({decoder_message(sf_err)}) and torchcodec "
                         "is unavailable") from None
    try:
        samples = AudioDecoder(raw).get_all_samples()
        return samples.data.numpy().T.astype(np.float32), int(samples.sample_rate)
    except Exception as e:
        raise AudioError("corrupt", f"{uri}: not decodable (soundfile: {decoder_message(sf_err)}; "
                         f"ffmpeg: {decoder_message(e)})") from None


def resample(wav: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """libsoxr's high-quality resampler (no torch: Ray's decode tasks stay light and start fast)."""
    if orig_sr == new_sr or len(wav) == 0:
        return wav.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(np.ascontiguousarray(wav, dtype=np.float32), orig_sr, new_sr, quality="HQ")


def load_audio(uri: str, sample_rate: int, offset_s: float = 0.0, duration_s: float | None = None) -> np.ndarray:
    """Decode `uri` (local or s3://), mono, resampled to `sample_rate`: the one entry point stages use."""
    wav, sr = decode(uri, offset_s, duration_s)
    return resample(wav, sr, sample_rate)


def peak_dbfs(wav: np.ndarray) -> float:
    peak = float(np.max(np.abs(wav))) if len(wav) else 0.0
    return -math.inf if peak <= 0 else 20 * math.log10(peak)


def validate(wav: np.ndarray, sample_rate: int, *, min_seconds: float, max_seconds: float,
             silence_dbfs: float, uri: str = "") -> float:
    """Raise AudioError unless the clip is non-empty, finite, not silent and within the duration limits.

    Returns the duration in seconds.
    """
    if len(wav) == 0:
        raise AudioError("empty", f"{uri} has no samples")
    if not np.all(np.isfinite(wav)):
        raise AudioError("corrupt", f"{uri} has NaN or infinite samples")
    duration = len(wav) / sample_rate
    if duration < min_seconds:
        raise AudioError("too_short", f"{uri} lasts {duration:.2f}s < {min_seconds}s")
    if duration > max_seconds:
        raise AudioError("too_long", f"{uri} lasts {duration:.1f}s > {max_seconds}s")
    level = peak_dbfs(wav)
    if level < silence_dbfs:
        raise AudioError("silent", f"{uri} peaks at {level:.1f} dBFS < {silence_dbfs} dBFS (silent)")
    return duration
