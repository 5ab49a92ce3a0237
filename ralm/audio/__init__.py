"""Audio decoding, resampling and validation."""

from ralm.audio.io import AudioError, decode, load_audio, probe, resample, validate

__all__ = ["AudioError", "decode", "load_audio", "probe", "resample", "validate"]
