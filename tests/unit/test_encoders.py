"""Encoders: registry, the CTranslate2 reader, Whisper numerics against CTranslate2, chunking, CREPE."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ralm.config import EncoderSpec
from ralm.encoders import ENCODERS, Encoder, build_encoder, describe_encoder, register_encoder
from ralm.encoders.ct2 import read_ct2, whisper_encoder_from_ct2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def whisper_tiny() -> Encoder:
    return build_encoder(EncoderSpec(name="whisper", model="whisper-tiny.en-ct2", layers=[2, 4], batch_size=4))


def test_registry_has_the_encoders_and_rejects_bad_names():
    build_or_describe = describe_encoder(EncoderSpec(name="crepe", model="crepe-tiny", layers=[4, 5, 6]))
    assert {"whisper", "crepe", "w2v-bert", "sslam", "muq"} <= set(ENCODERS)
    assert build_or_describe.width == 256 and build_or_describe.frame_rate == 50.0
    with pytest.raises(ValueError, match="must not contain"):
        register_encoder("a.b")
    with pytest.raises(KeyError, match="unknown encoder"):
        build_encoder(EncoderSpec(name="nope", model="x"))
    with pytest.raises(ValueError, match="different widths"):
        describe_encoder(EncoderSpec(name="crepe", model="crepe-tiny", layers=[1, 5]))


def test_hub_presets_describe_without_loading():
    info = describe_encoder(EncoderSpec(name="whisper", model="openai/whisper-large-v3", layers=[7, 15, 23, 31]))
    assert (info.width, info.frame_rate, info.sample_rate) == (1280, 50.0, 16000)
    w2v = describe_encoder(EncoderSpec(name="w2v-bert", model="facebook/w2v-bert-2.0"))
    assert w2v.width == 1024 and w2v.layers == [6, 12, 18, 24]
    muq = describe_encoder(EncoderSpec(name="muq", model="OpenMuQ/MuQ-large-msd-iter"))
    assert muq.sample_rate == 24000 and muq.frame_rate == 25.0


# ------------------------------------------------------------------------------------ CTranslate2 reader
def _write_ct2(path: Path, variables: dict[str, np.ndarray]) -> None:
    """Write CTranslate2's binary format (version 6), as `ModelSpec.save` does."""

    def s(x: str) -> bytes:
        return struct.pack("<H", len(x) + 1) + x.encode() + b"\0"

    ids = {np.dtype(np.float32): 0, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", 6) + s("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, v in variables.items():
        out += s(name) + struct.pack("<B", v.ndim) + b"".join(struct.pack("<I", d) for d in v.shape)
        out += struct.pack("<B", ids[v.dtype]) + struct.pack("<I", v.nbytes) + v.tobytes()
    path.write_bytes(out + struct.pack("<I", 0))


def _to_ct2(enc: torch.nn.Module, heads: int) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in enc.state_dict().items()}
    out = {"encoder/num_heads": np.array(heads, dtype=np.int16)}
    for a in ("conv1", "conv2"):
        out[f"encoder/{a}/weight"], out[f"encoder/{a}/bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    out["encoder/position_encodings/encodings"] = sd["embed_positions.weight"]
    out["encoder/layer_norm/gamma"], out["encoder/layer_norm/beta"] = sd["layer_norm.weight"], sd["layer_norm.bias"]
    for i in range(len(enc.layers)):
        p, q = f"encoder/layer_{i}", f"layers.{i}"
        kb = np.zeros_like(sd[f"{q}.self_attn.q_proj.bias"])
        out[f"{p}/self_attention/linear_0/weight"] = np.concatenate(
            [sd[f"{q}.self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"{p}/self_attention/linear_0/bias"] = np.concatenate(
            [sd[f"{q}.self_attn.q_proj.bias"], kb, sd[f"{q}.self_attn.v_proj.bias"]])
        out[f"{p}/self_attention/linear_1/weight"] = sd[f"{q}.self_attn.out_proj.weight"]
        out[f"{p}/self_attention/linear_1/bias"] = sd[f"{q}.self_attn.out_proj.bias"]
        out[f"{p}/self_attention/layer_norm/gamma"] = sd[f"{q}.self_attn_layer_norm.weight"]
        out[f"{p}/self_attention/layer_norm/beta"] = sd[f"{q}.self_attn_layer_norm.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{p}/ffn/linear_{j}/weight"], out[f"{p}/ffn/linear_{j}/bias"] = sd[f"{q}.{fc}.weight"], sd[f"{q}.{fc}.bias"]
        out[f"{p}/ffn/layer_norm/gamma"] = sd[f"{q}.final_layer_norm.weight"]
        out[f"{p}/ffn/layer_norm/beta"] = sd[f"{q}.final_layer_norm.bias"]
    return out


def test_ct2_reader_fills_a_tiny_random_whisper_encoder_exactly(tmp_path):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                        num_mel_bins=16, max_source_positions=30, decoder_layers=1, decoder_attention_heads=4)
    ref = WhisperEncoder(cfg).eval()
    with torch.no_grad():  # fp16 storage: make the reference weights fp16-exact so the comparison is exact
        for p in ref.parameters():
            p.copy_(p.half().float())
    _write_ct2(tmp_path / "model.bin", _to_ct2(ref, 4))
    assert read_ct2(str(tmp_path / "model.bin"), load=False)["encoder/conv1/weight"].shape == (64, 16, 3)
    loaded = whisper_encoder_from_ct2(str(tmp_path / "model.bin"))
    assert loaded.config.encoder_layers == 2 and loaded.config.encoder_attention_heads == 4
    x = torch.randn(2, 16, 60)
    with torch.no_grad():
        a, b = ref(x).last_hidden_state, loaded(x).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_whisper_tiny_matches_ctranslate2_reference(whisper_tiny):
    sys.path.insert(0, str(FIXTURES))
    from make_whisper_ct2_reference import reference_input

    ref = np.load(FIXTURES / "whisper_tiny_en_ct2_reference.npz")
    with torch.inference_mode():
        out = whisper_tiny.forward_features(torch.from_numpy(reference_input()))[4][0].numpy()
    assert out.shape == (1500, 384)
    np.testing.assert_allclose(out[ref["rows"]], ref["output"], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(out.mean(0), ref["mean"], atol=2e-5)


def test_building_an_encoder_skips_transformers_unused_optional_imports():
    """A fresh encoder worker does not pay for scikit-learn (assisted-generation tuning in transformers),
    the switch transformers reads is back as it was, and the encoder is the one the reference test checks."""
    import subprocess

    code = (
        "import sys, numpy as np, torch\n"
        "from ralm.config import EncoderSpec\n"
        "from ralm.encoders import build_encoder\n"
        "enc = build_encoder(EncoderSpec(name='whisper', model='whisper-tiny.en-ct2', layers=[4]))\n"
        "out = enc.encode([np.zeros(16000, dtype=np.float32)])[0]\n"
        "import transformers.utils as tu\n"
        "print('sklearn' in sys.modules, tu.is_sklearn_available(), out.shape)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import importlib.util

    installed = importlib.util.find_spec("sklearn") is not None  # librosa (torchcrepe) installs it
    assert run.stdout.split("\n")[-2] == f"False {installed} (1, 50, 384)", run.stdout


def test_whisper_frames_follow_the_clip_and_70s_is_chunked(whisper_tiny):
    rng = np.random.default_rng(0)
    clip70 = (0.1 * rng.standard_normal(70 * 16000)).astype(np.float32)
    short = clip70[: 16000 * 2 + 100]
    outs = whisper_tiny.encode([short, clip70])
    assert outs[0].shape == (2, 101, 384) and outs[0].dtype == np.float32
    assert outs[1].shape == (2, 3500, 384) and whisper_tiny.num_frames(len(clip70)) == 3500
    # The concatenation is exactly the three 30 s / 30 s / 10 s windows encoded on their own.
    parts = whisper_tiny.encode([clip70[:480000], clip70[480000:960000], clip70[960000:]])
    np.testing.assert_allclose(outs[1], np.concatenate(parts, axis=1), atol=1e-5)
    assert [p.shape[1] for p in parts] == [1500, 1500, 500]
    # A window's frames do not depend on what else is in the batch, to the bit (same inputs -> same shards).
    np.testing.assert_array_equal(whisper_tiny.encode([short])[0], outs[0])
    np.testing.assert_array_equal(whisper_tiny.encode([clip70[:48000], short, clip70[5:48005]])[1], outs[0])


def test_crepe_taps_and_frame_rate():
    enc = build_encoder(EncoderSpec(name="crepe", model="crepe-tiny", layers=[4, 6]))
    assert (enc.width, enc.frame_rate, enc.layers) == (256, 50.0, [4, 6])
    t = np.arange(16000) / 16000
    wav = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    out = enc.encode([wav, wav[:8000]])
    assert out[0].shape == (2, 50, 256) and out[1].shape == (2, 25, 256)
    # A frame sees only its own 1024-sample window: frames whose window ends inside the short clip agree.
    np.testing.assert_allclose(out[1][:, :23], out[0][:, :23], atol=1e-4)
    # Block 5 equals torchcrepe.embed's output on the same windows.
    import torchcrepe

    enc5 = build_encoder(EncoderSpec(name="crepe", model="crepe-tiny", layers=[5]))
    with torch.no_grad():
        ref = torchcrepe.embed(torch.from_numpy(wav)[None], 16000, hop_length=320, model="tiny")
    got = enc5.encode([wav])[0][0]
    np.testing.assert_allclose(got, ref[0, : got.shape[0]].reshape(got.shape[0], -1).numpy(), atol=1e-4)


def test_whisper_clip_window_encodes_only_the_clip_and_is_recorded(whisper_tiny):
    rng = np.random.default_rng(1)
    clip = (0.1 * rng.standard_normal(int(2.5 * 16000))).astype(np.float32)
    longer = (0.1 * rng.standard_normal(int(7.2 * 16000))).astype(np.float32)
    trimmed = build_encoder(EncoderSpec(name="whisper", model="whisper-tiny.en-ct2", layers=[2, 4],
                                        options={"window": "clip"}))
    a, b = trimmed.encode([clip, longer])
    full = whisper_tiny.encode([clip])[0]
    assert a.shape == full.shape == (2, 125, 384) and b.shape == (2, 360, 384)
    assert not np.allclose(a, full, atol=1e-3)  # a 3 s context, not the 30 s one
    # The same as one forward on the first 3 s of log-mel (300 frames), and independent of batch partners.
    mel = trimmed.log_mel([clip])[:, :, :300]
    states = trimmed.forward_features(mel)
    ref = torch.stack([states[2], states[4]], dim=1)[0, :, :125].numpy()
    np.testing.assert_allclose(a, ref, atol=1e-5)
    same_length = (0.1 * rng.standard_normal(int(2.2 * 16000))).astype(np.float32)  # also rounds up to 3 s
    np.testing.assert_array_equal(trimmed.encode([clip])[0], a)
    np.testing.assert_array_equal(trimmed.encode([same_length, clip, longer])[1], a)
    # The option travels with the features (training and inference must encode alike).
    assert trimmed.info().options == {"window": "clip"}
    assert describe_encoder(trimmed.spec).options == {"window": "clip"}
    with pytest.raises(ValueError, match="window"):
        build_encoder(EncoderSpec(name="whisper", model="whisper-tiny.en-ct2", options={"window": "10s"}))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_whisper_on_cuda_is_batch_invariant_and_matches_cpu(tmp_path, dtype: str):
    """On a GPU a clip's features are bit-identical alone and among other clips at another batch position
    (partial batches padded to one shape), in both window modes, and agree with the CPU float32 encoder."""
    from tests.fixtures.random_whisper import make_random_whisper

    folder = make_random_whisper(tmp_path / "whisper")
    rng = np.random.default_rng(0)
    clip, same_len, long70 = ((0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (2.5, 2.2, 70))
    for window in ("30s", "clip"):
        spec = dict(name="whisper", model=folder, layers=[2, 4], batch_size=4)
        gpu = build_encoder(EncoderSpec(**spec, num_gpus=1, options={"window": window, "dtype": dtype}))
        assert gpu.device.type == "cuda"
        alone = gpu.encode([clip])[0]
        among = gpu.encode([same_len, clip, long70])  # 5 windows in 30 s mode: a full batch, then a partial one
        np.testing.assert_array_equal(among[1], alone)
        np.testing.assert_array_equal(gpu.encode([long70, clip])[1], alone)
        assert among[2].shape == (2, 3500, 384)
        assert alone.dtype == np.dtype(dtype)  # fp16 stays fp16 (half the bytes to host memory)
        ref = build_encoder(EncoderSpec(**spec, options={"window": window})).encode([clip])[0]
        err = np.abs(alone.astype(np.float32) - ref).max() / np.abs(ref).max()
        assert err < (2e-2 if dtype == "float16" else 1e-3), (window, err)
