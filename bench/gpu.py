"""GPU throughput on one CUDA card, each figure against a baseline run in the same process.

- encoder: Whisper large-v3's shape (32 blocks, 1280 wide, 128 mels; the paper preset's taps 7/15/23/31)
  with random weights (the hub's weights don't install offline; speed depends on the shape, not the
  values), 30 s windows. Audio-seconds per second through `Encoder.encode` (log-mel on the CPU, fp16
  forward, features back to host memory, as a feature actor runs it) and through the forward alone, on
  the GPU in fp16 and fp32, vs the same encoder in fp32 on all of this machine's CPU cores.
- train: the ALM (frozen LLM + downsampler adapter) on Whisper-large-v3-like features (4 taps x 1280,
  10 s clips = 500 frames), a frozen LLM of SmolLM2-135M's and SmolLM2-1.7B's shape (random weights, the
  demo's tokenizer): samples/s of the DeepSpeed bf16 engine (`ralm.train.loop.ds_config`, ZeRO 0 and 2)
  vs a plain fp32 PyTorch loop on the same GPU, and peak GPU memory.

Prints one JSON line. Usage: python bench/gpu.py            (~2 min on an H100)
                             python bench/gpu.py --smoke    (tiny shapes, CPU allowed: checks the script)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import numpy as np
import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _timed(fn, repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t) / repeats


def bench_encoder(root: str, smoke: bool, cuda: bool) -> dict:
    from transformers import WhisperConfig, WhisperModel

    from ralm.config import EncoderSpec
    from ralm.encoders import build_encoder

    if smoke:
        shape, layers, batch, cpu_windows = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                                 encoder_ffn_dim=128, num_mel_bins=80), [1, 2], 4, 1
    else:
        shape, layers, batch, cpu_windows = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                                 encoder_ffn_dim=5120, num_mel_bins=128), [7, 15, 23, 31], 16, 2
    folder = os.path.join(root, "whisper")
    torch.manual_seed(0)
    WhisperModel(WhisperConfig(**shape, decoder_layers=1, decoder_attention_heads=4)).save_pretrained(folder)
    rng = np.random.default_rng(0)
    windows = [(0.1 * rng.standard_normal(30 * 16000)).astype(np.float32) for _ in range(batch * 2)]
    out: dict = {"shape": "tiny" if smoke else "whisper-large-v3", "taps": layers, "batch": batch}

    def encode_rate(enc, n_windows: int, repeats: int) -> float:
        return 30.0 * n_windows / _timed(lambda: enc.encode(windows[:n_windows]), repeats)

    def forward_rate(enc, repeats: int) -> float:
        mel = enc.log_mel(windows[: enc.spec.batch_size])
        return 30.0 * enc.spec.batch_size / _timed(lambda: enc.forward_features(mel), repeats)

    torch.set_num_threads(os.cpu_count() or 1)
    cpu = build_encoder(EncoderSpec(name="whisper", model=folder, layers=layers, batch_size=cpu_windows))
    with torch.inference_mode():
        out["cpu_fp32_audio_s_per_s"] = encode_rate(cpu, cpu_windows, 1)
    out["cpu_threads"] = torch.get_num_threads()
    del cpu
    _free()
    if cuda:
        for dtype in ("float16", "float32"):
            enc = build_encoder(EncoderSpec(name="whisper", model=folder, layers=layers, batch_size=batch,
                                            num_gpus=1, options={"dtype": dtype}))
            with torch.inference_mode():
                out[f"gpu_{dtype}_audio_s_per_s"] = encode_rate(enc, 2 * batch, 3)
                out[f"gpu_{dtype}_forward_audio_s_per_s"] = forward_rate(enc, 3)
            out[f"gpu_{dtype}_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            del enc
            _free()
        out["ratio_gpu_fp16_vs_cpu"] = out["gpu_float16_audio_s_per_s"] / out["cpu_fp32_audio_s_per_s"]
        out["forward_share_of_encode"] = out["gpu_float16_audio_s_per_s"] / out["gpu_float16_forward_audio_s_per_s"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


LLM_SHAPES = {  # SmolLM2 family (same tokenizer as the demo's model)
    "smollm2-135m": {},
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=16),
}


def make_llm(root: str, name: str, device: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ralm.llm.models import DEMO_MODEL, resolve_model

    demo = resolve_model(DEMO_MODEL)  # its config and tokenizer (the weights are not needed)
    cfg = AutoConfig.from_pretrained(demo)
    for k, v in LLM_SHAPES[name].items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    folder = os.path.join(root, name)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(demo).save_pretrained(folder)
    del model
    _free()
    return folder


def bench_train(root: str, llm: str, smoke: bool, device: str, steps: int, warmup: int) -> dict:
    import deepspeed

    from ralm.config import RalmConfig
    from ralm.model.alm import ALM
    from ralm.train.data import Example, collate
    from ralm.train.loop import ds_config

    width, taps, frames = (16, 2, 50) if smoke else (1280, 4, 500)
    encs = [{"name": "whisper", "width": width, "layers": list(range(taps)), "frame_rate": 50.0}]
    folder = make_llm(root, llm, device)
    rng = np.random.default_rng(0)
    answer = ("A woman speaks calmly over soft rain; she says the train to Leeds leaves from platform four "
              "at half past six, then repeats the platform number.")
    batch_size, hidden = (2, 32) if smoke else (8, 1024)
    out: dict = {"llm": llm, "batch": batch_size, "clip_frames": frames, "adapter_hidden": hidden}

    def batch(alm: ALM) -> dict:
        s, t = alm.encode_text("Describe what you hear.", answer)
        exs = [Example(f"x{i}", f"c{i}", {"whisper": rng.normal(size=(taps, frames, width)).astype(np.float16)},
                       s, t, 0) for i in range(batch_size)]
        return collate(exs)

    def run(alm: ALM, step_fn) -> float:
        col = batch(alm)
        for _ in range(warmup):
            step_fn(col)
        _sync()
        t = time.perf_counter()
        for _ in range(steps):
            step_fn(col)
        _sync()
        return batch_size * steps / (time.perf_counter() - t)

    # Baseline: plain PyTorch, fp32 weights, AdamW + clipping, on the same device.
    alm = ALM.build(folder, encs, adapter_hidden=hidden, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(alm.trainable_parameters(), lr=1e-4)

    def plain_step(col: dict, alm=alm, opt=opt) -> None:
        loss, _ = alm.loss(col)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(alm.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["plain_fp32_samples_per_s"] = run(alm, plain_step)
    out["plain_fp32_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    out["trainable_params_m"] = sum(p.numel() for p in alm.trainable_parameters()) / 1e6
    del alm, opt
    _free()

    for zero in (0, 2):
        tc = RalmConfig().train.model_copy(update={"precision": "bf16", "batch_size": batch_size,
                                                   "zero_stage": zero, "grad_clip": 1.0})
        bf16 = device == "cuda"
        alm = ALM.build(folder, encs, adapter_hidden=hidden, dtype=torch.bfloat16 if bf16 else torch.float32,
                        device=device)
        engine, _, _, _ = deepspeed.initialize(model=alm.frontend, config=ds_config(tc, bf16),
                                               optimizer=torch.optim.AdamW(alm.trainable_parameters(), lr=1e-4),
                                               dist_init_required=False)

        def ds_step(col: dict, alm=alm, engine=engine) -> None:
            loss, _ = alm.loss(col, frontend=engine)
            engine.backward(loss)
            engine.step()

        key = f"deepspeed_{'bf16' if bf16 else 'fp32'}_zero{zero}"
        out[f"{key}_samples_per_s"] = run(alm, ds_step)
        out[f"{key}_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
        out[f"ratio_{key}_vs_plain_fp32"] = out[f"{key}_samples_per_s"] / out["plain_fp32_samples_per_s"]
        del alm, engine
        _free()
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on a CPU too): checks the script")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["encoder", "train"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench/gpu.py needs a CUDA GPU (or --smoke to check the script on a CPU)")
    from ralm.train.loop import single_process_group

    device = "cuda" if cuda else "cpu"
    result: dict = {"bench": "gpu", "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        if "encoder" not in args.skip:
            result["encoder"] = bench_encoder(root, args.smoke, cuda)
        if "train" not in args.skip:
            with single_process_group("nccl" if cuda else "gloo"):
                result["train"] = [bench_train(root, llm, args.smoke, device, args.steps, args.warmup)
                                   for llm in (["tiny"] if args.smoke else ["smollm2-135m", "smollm2-1.7b"])]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
