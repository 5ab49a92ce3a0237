"""`ralm plan --config CONFIG --hours H [--instances N]`: what a run of that size costs, before it starts.

Instances are training (prompt, target) pairs, not machines; without `--instances` the paper's ratio of
instances to audio hours is assumed.

Projections are simple products of the corpus size and per-unit costs. Every per-unit cost is listed in
`ASSUMPTIONS` with where it comes from: the ALARM paper's reported wall times (calibration), arithmetic
on the model sizes, or a stated guess. Shard storage is exact arithmetic from the encoders' widths,
frame rates, tapped layers and the shard dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ralm.config import RalmConfig

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# name: (value, unit, source)
ASSUMPTIONS: dict[str, tuple[float, str, str]] = {
    "train_samples_per_gpu_s.fusion": (
        3.35, "samples/s/GPU",
        "ALARM paper: fusion stage 9-12 days on 4 H200 for 6.08M instances x 2 epochs (10.5 days midpoint)"),
    "train_samples_per_gpu_s.single": (
        4.69, "samples/s/GPU",
        "ALARM paper: single-encoder stage 6-9 days on 4 GPUs for 6.08M instances x 2 epochs (7.5 days)"),
    "llm_output_tokens_per_gpu_s": (
        8000.0, "tokens/s/GPU", "assumption: vLLM, 4B model, bf16, large batches on one H100/H200"),
    "generate_tokens_per_instance": (
        450.0, "tokens", "assumption: mean self-generated response under the 512-token cap (truncation kept)"),
    "rephrase_tokens_per_instance": (
        1200.0, "tokens", "assumption: rephraser thinking (budget ~1.5k) + rewritten answer"),
    "prompt_tokens_per_clip": (
        400.0, "tokens", "assumption: candidate prompts + checker verdicts per clip"),
    "encoder_realtime_factor.default": (
        1000.0, "audio s per GPU s", "assumption for an encoder not listed below"),
    "encoder_realtime_factor.whisper": (
        1300.0, "audio s per GPU s", "measured (bench/gpu.py, H100, fp16, batch 16): Whisper-large-v3's "
        "Encoder.encode incl. log-mel and the copy to host memory; its forward alone ran at ~4150"),
    "encoder_realtime_factor.w2v-bert": (2000.0, "audio s per GPU s", "arithmetic as for Whisper (600M params, 50 Hz)"),
    "encoder_realtime_factor.sslam": (8000.0, "audio s per GPU s", "arithmetic: ~90M-parameter ViT on fbank patches"),
    "encoder_realtime_factor.muq": (4000.0, "audio s per GPU s", "arithmetic: ~300M parameters at 25 Hz"),
    "encoder_realtime_factor.crepe": (3000.0, "audio s per GPU s", "assumption: CREPE full at 100 Hz"),
    "instances_per_audio_hour": (
        321.7, "instances per audio hour", "ALARM paper: 6.08M (prompt, target) instances from 18.9K h of audio"),
    "eval_items_per_gpu_s": (20.0, "items/s/GPU", "assumption: short MCQ answers through vLLM"),
}


def _a(name: str) -> float:
    return ASSUMPTIONS[name][0]


@dataclass
class Estimate:
    hours: float
    instances: int
    epochs: int
    gpu_hours: dict[str, float] = field(default_factory=dict)
    shard_bytes_per_audio_hour: float = 0.0
    shard_bytes_total: float = 0.0
    shard_bytes_by_encoder: dict[str, float] = field(default_factory=dict)
    tokens_generated: dict[str, float] = field(default_factory=dict)
    assumptions_used: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_gpu_hours(self) -> float:
        return sum(self.gpu_hours.values())


def estimate(cfg: RalmConfig, hours: float, instances: int | None = None, clips: int | None = None) -> Estimate:
    """Project GPU-hours per stage, shard storage and generated tokens for `hours` of audio and
    `instances` training (prompt, target) pairs (default: the paper's instances per audio hour)."""
    from ralm.encoders import describe_encoder

    if hours <= 0 or (instances is not None and instances <= 0):
        raise ValueError("hours and instances must be positive")
    used: list[str] = []

    def a(name: str) -> float:
        used.append(name)
        return _a(name)

    notes: list[str] = []
    if instances is None:
        instances = max(1, round(hours * a("instances_per_audio_hour")))
    elif not 1 <= instances / hours <= 100 * _a("instances_per_audio_hour"):
        notes.append(f"{instances:,} instances for {hours:,.0f} h of audio is {instances / hours:,.2f} per hour (the "
                     f"paper: {_a('instances_per_audio_hour'):,.0f}): --instances counts training (prompt, target) "
                     "pairs, not machines")
    est = Estimate(hours=hours, instances=instances, epochs=cfg.train.epochs, notes=notes)
    # Clips: the paper's corpus averages ~11 s per clip (18.9K h over 6.08M instances, ~1 instance per clip).
    n_clips = clips if clips is not None else instances
    itemsize = DTYPE_BYTES[cfg.shards.dtype]
    audio_s = hours * 3600
    feature_gpu_s = 0.0
    for spec in cfg.features.encoders:
        info = describe_encoder(spec)
        per_hour = info.bytes_per_second(itemsize) * 3600
        est.shard_bytes_by_encoder[spec.name] = per_hour * hours
        est.shard_bytes_per_audio_hour += per_hour
        key = f"encoder_realtime_factor.{spec.name}"
        rtf = a(key) if key in ASSUMPTIONS else a("encoder_realtime_factor.default")
        feature_gpu_s += audio_s / rtf
    est.shard_bytes_total = est.shard_bytes_per_audio_hour * hours
    est.gpu_hours["features"] = feature_gpu_s / 3600

    tok = a("llm_output_tokens_per_gpu_s")
    est.tokens_generated["prompts"] = n_clips * a("prompt_tokens_per_clip") if cfg.prompts.source == "llm" else 0.0
    est.tokens_generated["generate"] = instances * a("generate_tokens_per_instance")
    est.tokens_generated["rephrase"] = instances * a("rephrase_tokens_per_instance") if cfg.rephrase.enabled else 0.0
    for stage in ("prompts", "generate", "rephrase"):
        est.gpu_hours[stage] = est.tokens_generated[stage] / tok / 3600

    fused = len(cfg.features.encoders) > 1 and cfg.train.fusion != "sum"
    rate = a("train_samples_per_gpu_s.fusion" if fused else "train_samples_per_gpu_s.single")
    est.gpu_hours["train"] = instances * cfg.train.epochs / rate / 3600
    est.gpu_hours["eval"] = 7000 / a("eval_items_per_gpu_s") / 3600  # MMAU-mini + MMSU + MMAR
    est.assumptions_used = sorted(set(used))
    return est


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def render_table(est: Estimate) -> str:
    lines = [f"Plan for {est.hours:,.0f} h of audio, {est.instances:,} training instances ((prompt, target) pairs), "
             f"{est.epochs} epochs", *(f"note: {n}" for n in est.notes), "",
             f"{'stage':<10} {'GPU-hours':>12} {'tokens generated':>18}"]
    for stage, gh in est.gpu_hours.items():
        toks = est.tokens_generated.get(stage)
        lines.append(f"{stage:<10} {gh:>12,.1f} {'' if toks is None else f'{toks:,.0f}':>18}")
    lines.append(f"{'total':<10} {est.total_gpu_hours:>12,.1f} {sum(est.tokens_generated.values()):>18,.0f}")
    lines += ["", f"shards: {_human_bytes(est.shard_bytes_per_audio_hour)} per audio-hour, "
                  f"{_human_bytes(est.shard_bytes_total)} in total"]
    lines += [f"  {name}: {_human_bytes(b)}" for name, b in est.shard_bytes_by_encoder.items()]
    lines += ["", "assumptions:"]
    for name in est.assumptions_used:
        value, unit, source = ASSUMPTIONS[name]
        lines.append(f"  {name} = {value:g} {unit} ({source})")
    return "\n".join(lines)


def render_json(est: Estimate) -> str:
    d: dict[str, Any] = asdict(est) | {"total_gpu_hours": est.total_gpu_hours}
    d["assumptions"] = {k: {"value": ASSUMPTIONS[k][0], "unit": ASSUMPTIONS[k][1], "source": ASSUMPTIONS[k][2]}
                        for k in est.assumptions_used}
    return json.dumps(d, indent=2)
