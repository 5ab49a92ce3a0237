"""Follow-up turns of a conversation about a clip: the encoders' feature cache on vs off.

A conversation (`ralm chat` without a question, an OpenAI client's next turn to `ralm serve`) sends its clip
with every turn. `ALMInference` keeps the frozen encoders' output by audio content (`FeatureCache`,
`eval.serve.feature_cache_mb`), so a follow-up costs the LLM's prompt and answer only. This bench runs the
same conversations through `ralm.eval.inference.converse` twice, the cache off (the baseline: every turn
encodes the clip, as before the cache) and on, each after an untimed warm-up conversation, and prints one
JSON line: seconds per follow-up turn (turns 2..T) and per first turn both ways, `ratio` (= uncached /
cached seconds per follow-up), the encoders' seconds per clip, and `same_answers` (every answer equal both
ways: greedy, the cached features are the same arrays).

  python bench/chat.py [--export runs/demo/train/export] [--clips 4] [--turns 4] [--seconds 10]
                       [--max-tokens 24]
Without `--export` (or when the demo has not been trained) it uses the demo's frozen LLM (SmolLM2-135M)
with an untrained adapter on Whisper tiny.en (`bench/serve.py`'s `build_export`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import QUESTIONS, build_export  # noqa: E402  (bench/serve.py)


def clip(i: int, seconds: float, sr: int = 16000) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(100 + i)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * (130 * (1 + i % 7)) * t) + 0.05 * rng.standard_normal(len(t))
    return wav.astype(np.float32), sr


def conversations(engine, clips: list, turns: int, max_tokens: int) -> dict:
    """Every clip's conversation; seconds of each first turn and each follow-up, and the answers."""
    from ralm.eval.inference import converse

    first, follow, answers = [], [], []
    questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(turns)]
    for audio in clips:
        talk = converse(engine, audio, questions, max_tokens)
        for k in range(turns):
            t = time.perf_counter()
            answers.append(next(talk))
            (first if k == 0 else follow).append(time.perf_counter() - t)
    return {"first_turn_s": round(float(np.mean(first)), 3), "follow_up_s": round(float(np.mean(follow)), 3),
            "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default="runs/demo/train/export", help="exported adapter (built if missing)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    if args.turns < 2:
        ap.error("--turns must be >= 2 (a follow-up is turn 2 and later)")

    import torch

    from ralm.config import load_config
    from ralm.encoders.cache import FeatureCache
    from ralm.eval.inference import ALMInference

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(args.config)
    trained = os.path.exists(os.path.join(args.export, "adapter.json"))
    export = args.export if trained else build_export(tempfile.mkdtemp(prefix="ralm-bench-chat-"))
    engine = ALMInference([export], encoder_specs=cfg.features.encoders)
    rate = max(engine.sample_rates)
    clips = [clip(i, args.seconds, rate) for i in range(args.clips)]
    t = time.perf_counter()
    for audio in clips:
        engine.featurize(*audio)  # the encoders alone, for scale (distinct clips: every one a miss)
    encode_s = (time.perf_counter() - t) / len(clips)
    runs, budget = {}, engine.feature_cache.max_bytes
    for name, cache_bytes in (("uncached", 0), ("cached", budget)):
        engine.feature_cache = FeatureCache(cache_bytes)
        conversations(engine, [clip(1000, args.seconds, rate)], args.turns, args.max_tokens)  # warm-up
        runs[name] = conversations(engine, clips, args.turns, args.max_tokens)
        runs[name]["cache"] = engine.feature_cache.stats()
    base, cached = runs["uncached"], runs["cached"]
    same = base.pop("answers") == cached.pop("answers")
    print(json.dumps({"bench": "chat", "export": export if trained else "untrained (built)",
                      "encoders": [f"{e.name}:{e.model}" for e in engine.encoder_infos.values()],
                      "clips": args.clips, "turns": args.turns, "clip_seconds": args.seconds,
                      "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "encode_s_per_clip": round(encode_s, 3),
                      "uncached": base, "cached": cached,
                      "ratio": round(base["follow_up_s"] / cached["follow_up_s"], 3), "same_answers": same}))
    engine.close()


if __name__ == "__main__":
    main()
