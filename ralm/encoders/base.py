"""The encoder interface and its registry.

An encoder turns mono float32 waveforms at its `sample_rate` into the hidden states of its tapped
`layers`: one float32 array of shape (len(layers), frames, width) per clip, `frames` covering the clip's
real length at `frame_rate` frames per second. Encoders are frozen (eval, no grad); audio longer than an
encoder's window is chunked and the frames concatenated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads where an encoder is built, not where one is only described
    import torch

from ralm.config import EncoderSpec

ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(name: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator: `@register_encoder("whisper")` makes `EncoderSpec(name="whisper")` build it."""

    if "." in name or "/" in name:  # the name becomes a WebDataset suffix: `{clip_id}.{name}.npy`
        raise ValueError(f"encoder name {name!r} must not contain '.' or '/'")

    def wrap(cls: type[Encoder]) -> type[Encoder]:
        ENCODERS[name] = cls
        cls.kind = name
        return cls

    return wrap


@dataclass(frozen=True)
class EncoderInfo:
    """What training and the storage math need to know, without running the encoder."""

    name: str
    model: str
    layers: list[int]
    width: int
    frame_rate: float
    sample_rate: int
    window_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the spec's options (they can change the features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_frames(self, duration_s: float) -> int:
        return frames_for(duration_s, self.frame_rate)

    def bytes_per_second(self, itemsize: int) -> float:
        return self.frame_rate * len(self.layers) * self.width * itemsize


def feature_options(spec: EncoderSpec) -> dict[str, Any]:
    """The spec options that shape the features (recorded with them); placement options are not."""
    return {k: v for k, v in spec.options.items() if k not in ("device",)}


def frames_for(duration_s: float, frame_rate: float) -> int:
    # A frame covers 1/frame_rate s; a partial last frame counts (round first: 3.0 s * 50 must be 150).
    return max(1, math.ceil(round(duration_s * frame_rate, 6)))


class Encoder(ABC):
    """Base class. Subclasses set the attributes in `__init__` and implement `_encode_window`."""

    kind: str = ""
    name: str
    model: str
    sample_rate: int
    frame_rate: float
    width: int
    layers: list[int]
    num_layers: int  # how many layers exist (valid tap indices: see `check_layers`)
    window_s: float | None = None  # longest input one forward takes; longer audio is chunked

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.name = spec.name
        self.model = spec.model
        import torch

        self.device = torch.device(spec.options.get("device", "cuda" if spec.num_gpus > 0 else "cpu"))

    # ------------------------------------------------------------------ public
    def encode(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """(len(layers), frames, width) per clip, frames truncated to the clip's real length; float32, or
        float16 from an encoder that runs in float16 (widening it would only double the bytes moved)."""
        import torch

        # Split every clip into windows, run all windows as one list (batched by the subclass), regroup.
        pieces: list[np.ndarray] = []
        owners: list[int] = []
        for i, wav in enumerate(wavs):
            wav = np.asarray(wav, dtype=np.float32).reshape(-1)
            for chunk in self._chunks(wav):
                pieces.append(chunk)
                owners.append(i)
        outs: list[np.ndarray] = []
        # A clip's features must not depend on the clips that share its batch (same inputs -> same shard
        # bytes, also when a resumed run batches differently): matmul kernels pick their blocking by shape,
        # and Whisper windows batched 3 vs 4 differed by an fp16 ulp. Fixed shapes make them invariant: on
        # CPU each window runs alone (Whisper tiny: 0.337 CPU-s per clip alone, 0.362 in batches of 4); on
        # an accelerator a partial batch is padded to `batch_size` with silence.
        bs = 1 if self.device.type == "cpu" else max(1, int(self.spec.batch_size))
        with torch.inference_mode():
            for s in range(0, len(pieces), bs):
                batch = pieces[s : s + bs]
                padded = batch + [np.zeros_like(batch[-1])] * (bs - len(batch))
                outs.extend(self._encode_window(padded)[: len(batch)])
        per_clip: list[list[np.ndarray]] = [[] for _ in wavs]
        for owner, out in zip(owners, outs, strict=True):
            per_clip[owner].append(out)
        return [np.ascontiguousarray(np.concatenate(p, axis=1), dtype=_out_dtype(p[0])) for p in per_clip]

    def num_frames(self, n_samples: int) -> int:
        """Frames `encode` returns for a clip of `n_samples` samples (chunks add up exactly)."""
        return sum(frames_for(len_ / self.sample_rate, self.frame_rate) for len_ in self._chunk_lengths(n_samples))

    def info(self) -> EncoderInfo:
        return EncoderInfo(self.name, self.model, list(self.layers), int(self.width), float(self.frame_rate),
                           int(self.sample_rate), self.window_s, feature_options(self.spec))

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _encode_window(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Encode clips no longer than `window_s`: float32 (len(layers), frames_for(len), width) each."""

    def _chunk_lengths(self, n: int) -> list[int]:
        if self.window_s is None:
            return [max(n, 1)]
        win = int(round(self.window_s * self.sample_rate))
        return [min(win, n - s) for s in range(0, n, win)] or [1]

    def _chunks(self, wav: np.ndarray) -> list[np.ndarray]:
        if len(wav) == 0:
            wav = np.zeros(1, dtype=np.float32)
        out, start = [], 0
        for n in self._chunk_lengths(len(wav)):
            out.append(wav[start : start + n])
            start += n
        return out

    def check_layers(self, layers: list[int], default: list[int], valid: range) -> list[int]:
        layers = list(layers) or list(default)
        bad = [x for x in layers if x not in valid]
        if bad:
            raise ValueError(
                f"encoder {self.name!r} ({self.model}): layers {bad} not tappable; valid are "
                f"{valid.start}..{valid.stop - 1}"
            )
        return layers


def _out_dtype(a: np.ndarray) -> type:
    return np.float16 if a.dtype == np.float16 else np.float32


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder named by `spec.name` (see `ENCODERS`), loaded and frozen."""
    _ensure_registered()
    try:
        cls = ENCODERS[spec.name if spec.name in ENCODERS else spec.options.get("kind", spec.name)]
    except KeyError:
        raise KeyError(
            f"unknown encoder {spec.name!r}; registered: {sorted(ENCODERS)} "
            "(or set options.kind to one of them to give an encoder another name)"
        ) from None
    return cls(spec)


# transformers modules that import an optional package at module level for something a frozen encoder
# never runs, and the availability switch each one reads: assisted generation's draft-threshold tuning
# (scikit-learn's `roc_curve`) and the object-detection losses' matcher (scipy's `linear_sum_assignment`).
# Every transformers model class pulls both in; encoders built on transformers call
# `lean_transformers_import` before importing it. Measured on 2 cores: 2.8 of an encoder process's ~9 s of
# imports (scikit-learn, installed for librosa, brings scipy.stats and pandas).
_UNUSED_OPTIONAL_IMPORTS = (("transformers.generation.candidate_generator", "is_sklearn_available"),
                            ("transformers.loss.loss_utils", "is_scipy_available"))


def lean_transformers_import() -> None:
    """Import those transformers modules with their switches off, then restore the switches at once: only
    the modules imported here see them off (an encoder worker starts faster; nothing else changes). With
    them already imported, or a transformers without the switches, this does nothing."""
    import importlib
    import sys

    todo = [(m, flag) for m, flag in _UNUSED_OPTIONAL_IMPORTS if m not in sys.modules]
    if not todo:
        return
    try:
        import transformers.utils as tu
    except ImportError:  # an encoder without transformers
        return
    saved = {flag: getattr(tu, flag) for _, flag in todo if hasattr(tu, flag)}
    try:
        for flag in saved:
            setattr(tu, flag, lambda: False)
        for module, _ in todo:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - a speed-up only: the encoder's own import reports real errors
                pass
    finally:
        for flag, fn in saved.items():
            setattr(tu, flag, fn)


def describe_encoder(spec: EncoderSpec) -> EncoderInfo:
    """Encoder metadata without loading weights where the class can (`describe`); else build it."""
    _ensure_registered()
    cls = ENCODERS.get(spec.name) or ENCODERS.get(spec.options.get("kind", ""))
    if cls is not None and hasattr(cls, "describe"):
        return cls.describe(spec)  # type: ignore[attr-defined]
    return build_encoder(spec).info()


def _ensure_registered() -> None:
    # Importing the modules runs their @register_encoder decorators.
    from ralm.encoders import crepe, presets, whisper  # noqa: F401
