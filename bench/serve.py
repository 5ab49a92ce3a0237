"""Trained-ALM serving under concurrent clients: requests batched in the replica vs one at a time.

`ralm serve` answers concurrent non-streamed requests with the same settings in one engine call
(`eval.serve.max_batch_size`). This bench starts the ALM Serve app twice on a local Ray, first with
`max_batch_size: 1` (each request alone, the baseline) then batched, and sends the same requests from
`--clients` concurrent OpenAI clients over HTTP each time (different clips, greedy; `--stream`: the clients
stream the answers; `--temperature T`: sampled answers, request i with seed i, so both runs draw the same). Prints one JSON line:
completion tokens per second and requests per second for both, `ratio` (= batched / one-at-a-time tokens/s),
the batch sizes the replica ran (its `GET /stats`) and `same_answers` (share of answers equal in both runs:
batched greedy decoding may differ in the last bits of padded positions).

  python bench/serve.py [--export runs/demo/train/export] [--clients 8] [--requests 48] [--max-tokens 32]
                        [--max-batch 8] [--stream] [--temperature 0.8] [--backend vllm]
Without `--export` (or when the demo has not been trained) it serves the demo's frozen LLM (SmolLM2-135M)
with an untrained adapter on Whisper tiny.en: an adapter's weights do not change the serving cost.
The JSON line is the last line of stdout.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf

WHISPER_TINY = {"name": "whisper", "model": "whisper-tiny.en-ct2", "layers": [2, 4], "width": 384,
                "frame_rate": 50.0, "sample_rate": 16000}
QUESTIONS = ["What do you hear?", "Describe the sound.", "Is there speech in this clip?", "What is the pitch?"]


def build_export(root: str) -> str:
    """The demo's frozen LLM + an untrained downsampler adapter on Whisper tiny.en, exported."""
    from ralm.llm.models import resolve_model
    from ralm.model.alm import ALM
    from ralm.model.export import export_adapter

    alm = ALM.build(resolve_model("smollm2-135m-demo"), [WHISPER_TINY], adapter="downsampler", adapter_hidden=256,
                    llm_name="smollm2-135m-demo")
    return export_adapter(alm, os.path.join(root, "export"))


def clip_b64(i: int, seconds: float = 2.0, sr: int = 16000) -> str:
    rng = np.random.default_rng(i)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * (110 * (1 + i % 12)) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), sr, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                                         {"type": "input_audio", "input_audio": {"data": clip_b64(i), "format": "wav"}}]}]


def run_clients(svc, n_requests: int, clients: int, max_tokens: int, stream: bool = False,
                temperature: float = 0.0) -> dict:
    import openai

    client = openai.OpenAI(base_url=svc.url, api_key="unused", max_retries=0, timeout=600)

    def ask(i: int) -> tuple[str, int]:
        kw = {"model": svc.model, "messages": messages(i), "max_tokens": max_tokens, "temperature": temperature,
              "seed": i}
        if stream:
            chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.completion_tokens
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content or "", r.usage.completion_tokens

    ask(10_000)  # the replica's first request (lazy initialisation) is not timed
    stats_url = svc.url[: -len("/v1")] + "/stats"
    before = json.loads(urllib.request.urlopen(stats_url, timeout=60).read())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(ask, range(n_requests)))
    wall = time.perf_counter() - t0
    after = json.loads(urllib.request.urlopen(stats_url, timeout=60).read())
    tokens = sum(n for _, n in out)
    sizes = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    return {"wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(n_requests / wall, 3),
            "batch_sizes": {k: v for k, v in sizes.items() if v}, "answers": [a for a, _ in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default="runs/demo/train/export", help="exported adapter (built if missing)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--port", type=int, default=18791)
    ap.add_argument("--stream", action="store_true", help="the clients stream (stream: true)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampled answers (request i: seed i)")
    ap.add_argument("--backend", default=None, help="eval.backend: transformers | vllm (default: the config's)")
    args = ap.parse_args()

    from ralm.cluster import init_ray
    from ralm.config import load_config
    from ralm.serve.alm_app import serve_alm, stop_alm

    cfg = load_config(args.config)
    tmp = tempfile.mkdtemp(prefix="ralm-bench-serve-")
    export = args.export if os.path.exists(os.path.join(args.export, "adapter.json")) else build_export(tmp)
    cfg.eval.serve.port = args.port
    cfg.eval.backend = args.backend or cfg.eval.backend
    cfg.eval.serve.max_ongoing_requests = max(args.clients, args.max_batch)
    init_ray(cfg.ray)
    runs = {}
    for name, max_batch in (("one_at_a_time", 1), ("batched", args.max_batch)):
        cfg.eval.serve.max_batch_size = max_batch
        svc = serve_alm(cfg, tmp, adapters=[export])
        try:
            runs[name] = run_clients(svc, args.requests, args.clients, args.max_tokens, args.stream,
                                     args.temperature)
        finally:
            stop_alm(svc)
    base, batched = runs["one_at_a_time"], runs["batched"]
    same = sum(a == b for a, b in zip(base.pop("answers"), batched.pop("answers"), strict=True)) / args.requests
    print(json.dumps({"bench": "serve", "export": export if export == args.export else "untrained (built)",
                      "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
                      "max_batch_size": args.max_batch, "stream": args.stream,
                      "temperature": args.temperature, "backend": cfg.eval.backend, "cpus": os.cpu_count(), "one_at_a_time": base,
                      "batched": batched, "ratio": round(batched["tokens_per_s"] / base["tokens_per_s"], 3),
                      "same_answers": round(same, 3)}))


if __name__ == "__main__":
    main()
