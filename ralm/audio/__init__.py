"""Audio decoding, resampling and validation."""

from ralm.audio.io import AudioError, StorageError, decode, load_audio, probe, resample, validate

__all__ = ["AudioError", "StorageError", "decode", "load_audio", "probe", "resample", "validate"]
