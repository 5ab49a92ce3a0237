"""Frozen audio encoders behind one interface, selected by name from a registry."""

from ralm.encoders.base import (
    ENCODERS,
    Encoder,
    EncoderInfo,
    build_encoder,
    describe_encoder,
    frames_for,
    register_encoder,
)

__all__ = ["ENCODERS", "Encoder", "EncoderInfo", "build_encoder", "describe_encoder", "frames_for",
           "register_encoder"]
