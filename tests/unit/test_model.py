"""The ALM's components (no Ray): adapters, fusions, splicing/labels, answer-only loss, export, inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ralm.model.adapters import ADAPTERS, build_adapter
from ralm.model.alm import ALM, IGNORE
from ralm.model.export import export_adapter, load_alm
from ralm.model.fusion import FUSIONS, align_to, build_fusion
from ralm.model.layers import LayerMix

ENCS = [{"name": "enc_a", "width": 16, "layers": [1, 2], "frame_rate": 50.0},
        {"name": "enc_b", "width": 8, "layers": [3], "frame_rate": 100.0}]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ralm.llm.models import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("llm") / "tiny"))


@pytest.fixture(scope="module")
def alm(llm_dir: str) -> ALM:
    return ALM.build(llm_dir, ENCS, adapter_hidden=32, fusion="sum")


def feats(frames: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"enc_a": rng.normal(size=(2, frames, 16)).astype(np.float16),
            "enc_b": rng.normal(size=(1, 2 * frames, 8)).astype(np.float16)}


def test_layer_mix_starts_as_mean_and_checks_layers():
    x = torch.randn(2, 3, 5, 4)
    assert torch.allclose(LayerMix(3)(x), x.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="tapped layers"):
        LayerMix(2)(x)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapters_ignore_padding_and_report_lengths(name: str):
    torch.manual_seed(0)
    ad = build_adapter(name, 16, 24, 32).eval()
    a, b = torch.randn(1, 11, 16), torch.randn(1, 20, 16)
    batch = torch.zeros(2, 20, 16)
    batch[0, :11], batch[1] = a[0], b[0]
    out, lens = ad(batch, torch.tensor([11, 20]))
    single, n = ad(a, torch.tensor([11]))
    assert int(lens[0]) == int(n[0]) == single.shape[1]
    assert torch.allclose(out[0, : int(n[0])], single[0], atol=1e-5)
    assert torch.all(out[0, int(n[0]):] == 0)
    if name == "downsampler":  # halves the frame rate
        assert lens.tolist() == [5, 10] and ad.stride == 2
    if name == "downsampler4":  # frames averaged in pairs (an odd last frame alone), then halved again
        assert lens.tolist() == [3, 5] and ad.stride == 4
    if name == "downsampler8":  # groups of 4 frames (11 -> 3 groups, 20 -> 5), then halved
        assert lens.tolist() == [1, 2] and ad.stride == 8
    if name == "downsampler16":  # groups of 8 frames (11 -> 2 groups, 20 -> 3), then halved
        assert lens.tolist() == [1, 1] and ad.stride == 16


def test_downsampler4_is_the_downsampler_on_pair_averaged_frames():
    torch.manual_seed(0)
    quarter, half = build_adapter("downsampler4", 16, 24, 32).eval(), build_adapter("downsampler", 16, 24, 32).eval()
    half.load_state_dict(quarter.state_dict())
    x = torch.randn(1, 7, 16)
    pooled = torch.cat([x[:, :6].reshape(1, 3, 2, 16).mean(2), x[:, 6:]], dim=1)  # 3 pairs + the odd frame
    out, n = quarter(x, torch.tensor([7]))
    ref, m = half(pooled, torch.tensor([4]))
    assert int(n[0]) == int(m[0]) == 2
    assert torch.allclose(out, ref, atol=1e-6)
    eighth = build_adapter("downsampler8", 16, 24, 32).eval()
    eighth.load_state_dict(half.state_dict())
    x = torch.randn(1, 10, 16)
    pooled = torch.cat([x[:, :8].reshape(1, 2, 4, 16).mean(2), x[:, 8:].mean(1, keepdim=True)], dim=1)  # 4+4+2
    out, n = eighth(x, torch.tensor([10]))
    ref, m = half(pooled, torch.tensor([3]))
    assert int(n[0]) == int(m[0]) == 1
    assert torch.allclose(out, ref, atol=1e-6)
    sixteenth = build_adapter("downsampler16", 16, 24, 32).eval()
    sixteenth.load_state_dict(half.state_dict())
    x = torch.randn(1, 36, 16)
    pooled = torch.cat([x[:, :32].reshape(1, 4, 8, 16).mean(2), x[:, 32:].mean(1, keepdim=True)], dim=1)  # 4x8+4
    out, n = sixteenth(x, torch.tensor([36]))
    ref, m = half(pooled, torch.tensor([5]))
    assert int(n[0]) == int(m[0]) == 2
    assert torch.allclose(out, ref, atol=1e-6)


def test_align_to_maps_timelines_by_rate():
    x = torch.arange(8.0).view(1, 8, 1)  # 8 frames at 4 Hz = 2 s
    out = align_to(x, torch.tensor([8]), rate=4.0, main_len=4, main_rate=2.0)
    assert out.view(-1).tolist() == [1.0, 3.0, 5.0, 7.0]
    short = align_to(x, torch.tensor([3]), rate=4.0, main_len=4, main_rate=2.0)
    assert short.view(-1).tolist() == [1.0, 2.0, 2.0, 2.0]  # clamped to the extra stream's length


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fusions_shapes(name: str):
    torch.manual_seed(0)
    opts = {"num_latents": 3} if name == "perceiver" else {}
    fusion = build_fusion(name, ["a", "b"], 32, **opts)
    streams = {"a": (torch.randn(2, 6, 32), torch.tensor([6, 4]), 25.0),
               "b": (torch.randn(2, 9, 32), torch.tensor([9, 5]), 50.0)}
    out, lens = fusion(streams)
    extra = 3 if name == "perceiver" else 0
    assert out.shape == (2, 6 + extra, 32) and lens.tolist() == [6 + extra, 4 + extra]
    assert torch.isfinite(out).all()
    with pytest.raises(KeyError, match="registered"):
        build_fusion("nope", ["a"], 32)


def test_only_the_frontend_trains(alm: ALM):
    alm.assert_frozen()
    trainable = {id(p) for p in alm.trainable_parameters()}
    assert trainable == {id(p) for p in alm.frontend.parameters()}
    assert not any(p.requires_grad for p in alm.llm.parameters())
    p = next(alm.llm.parameters())
    p.requires_grad_(True)
    try:
        with pytest.raises(AssertionError, match="frozen"):
            alm.assert_frozen()
    finally:
        p.requires_grad_(False)


def test_layout_puts_audio_first_in_user_turn_without_system_prompt(alm: ALM):
    lay = alm.layout
    assert lay.prefix_text == "<|im_start|>user\n"  # SmolLM2's default system turn is dropped
    assert lay.suffix_text("Q?") == "\n\nQ?<|im_end|>\n<|im_start|>assistant\n"
    # Text-only prompts keep the template exactly as the frozen LLM gets it (default system turn included).
    plain = alm.tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                              add_generation_prompt=True)
    assert lay.text_prompt_ids("Q?") == alm.tokenizer(plain, add_special_tokens=False)["input_ids"]


def test_a_conversation_keeps_the_trained_layout_around_the_audio(alm: ALM):
    from ralm.model.chat import ChatLayout, Dialogue

    lay, tok = alm.layout, alm.tokenizer

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    # One question as a dialogue is laid out exactly as in training.
    assert lay.around_audio(Dialogue((("user", "Q?"),))) == (lay.prefix_ids, lay.suffix_ids("Q?"))
    follow_up = (("user", "Q1"), ("assistant", "A1"), ("user", "Q2"))
    head, tail = lay.around_audio(Dialogue(follow_up, audio_turn=0))
    assert text(head) == "<|im_start|>user\n"  # no default system turn, as trained
    assert text(tail) == ("\n\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                          "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    head, tail = lay.around_audio(Dialogue(follow_up, audio_turn=2))  # the clip comes with the second question
    assert text(head) == "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\n"
    assert text(tail) == "\n\nQ2<|im_end|>\n<|im_start|>assistant\n"
    head, _ = ChatLayout(tok, "Be brief.").around_audio(Dialogue(follow_up))
    assert text(head) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    # Without audio a conversation is the frozen LLM's own chat prompt.
    plain = tok.apply_chat_template([{"role": r, "content": t} for r, t in follow_up], tokenize=False,
                                    add_generation_prompt=True)
    assert lay.text_prompt_ids(Dialogue(follow_up)) == tok(plain, add_special_tokens=False)["input_ids"]
    for turns, audio_turn in [((("assistant", "A"), ("user", "Q")), 0), ((("user", "Q"), ("assistant", "A")), 0),
                              (follow_up, 1), (follow_up, 3), ((("user", "Q"), ("tool", "{}"), ("user", "Q")), 0)]:
        with pytest.raises(ValueError):
            Dialogue(turns, audio_turn)


def test_labels_mask_everything_but_the_response(alm: ALM):
    target = "<think>It rings.</think> A bell."
    s1, t1 = alm.encode_text("What is it?", target)
    s2, t2 = alm.encode_text("Longer question here?", "No.")
    audio = torch.randn(2, 7, 64)
    emb, mask, labels = alm.assemble(audio, torch.tensor([7, 4]), [s1, s2], [t1, t2])
    n_pre = len(alm.layout.prefix_ids)
    lens = [n_pre + 7 + 2 + len(s1) + len(t1), n_pre + 4 + 2 + len(s2) + len(t2)]
    assert mask.sum(1).tolist() == lens
    for i, (t, n) in enumerate([(t1, lens[0]), (t2, lens[1])]):
        lab = labels[i, :n]
        assert lab[: n - len(t)].eq(IGNORE).all() and lab[n - len(t):].tolist() == t
        assert labels[i, n:].eq(IGNORE).all()
    assert alm.tokenizer.decode(t1) == target  # thinking kept, no EOS appended
    assert alm.tokenizer.eos_token_id not in t1
    # The audio block sits right after the user header, between the learned start/end embeddings.
    assert torch.equal(emb[0, n_pre], alm.frontend.audio_start.detach())
    assert torch.equal(emb[0, n_pre + 8], alm.frontend.audio_end.detach())
    assert torch.equal(emb[1, n_pre + 1: n_pre + 5], audio[1, :4])


def test_answer_only_loss_equals_full_logits_loss(alm: ALM):
    s, t = alm.encode_text("What?", "A dog barking loudly.")
    emb, mask, labels = alm.assemble(torch.randn(1, 5, 64), torch.tensor([5]), [s], [t])
    loss, n = alm.answer_loss(emb, mask, labels)
    logits = alm.llm(inputs_embeds=emb, attention_mask=mask).logits
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE)
    assert n == len(t) and torch.allclose(loss, ref, atol=1e-5)


def test_loss_backpropagates_into_the_frontend_only(alm: ALM):
    from ralm.train.data import Example, collate

    s, t = alm.encode_text("What?", "A bell.")
    f = {k: v for k, v in feats(12).items()}
    batch = collate([Example("x", "c", f, s, t, 0), Example("y", "d", feats(20, 1), s, t, 0)])
    alm.zero_grad()
    loss, _ = alm.loss(batch)
    loss.backward()
    assert all(p.grad is not None for p in alm.frontend.parameters())
    assert all(p.grad is None for p in alm.llm.parameters())
    alm.zero_grad()


@pytest.mark.parametrize("fusion", ["sum", "crossattention", "perceiver"])
def test_audio_tokens_start_at_the_llms_embedding_scale(llm_dir: str, fusion: str):
    """A fresh frontend's audio tokens are as long as the LLM's text embeddings (not ~10x longer), centred
    over the real tokens (no constant soft prompt can hide in them), and padded positions stay exactly zero."""
    model = ALM.build(llm_dir, ENCS, adapter_hidden=32, fusion=fusion, seed=0)
    text_norm = model.llm.get_input_embeddings().weight.detach().float().norm(dim=1).mean()
    x = {k: torch.from_numpy(v.astype(np.float32))[None].repeat(2, 1, 1, 1) * 50 for k, v in feats(30).items()}
    lens = {"enc_a": torch.tensor([30, 10]), "enc_b": torch.tensor([60, 20])}
    with torch.no_grad():
        audio, n = model.frontend(x, lens)
    real = torch.cat([audio[0, : int(n[0])], audio[1, : int(n[1])]])
    assert float(real.norm(dim=1).mean()) == pytest.approx(float(text_norm), rel=0.25)
    assert float(real.mean(0).norm()) < 1e-3 * float(text_norm)  # centred: no shared constant vector
    assert int(n[1]) < int(n[0]) and torch.count_nonzero(audio[1, int(n[1]):]) == 0
    # At inference the running statistics are used: a single clip is not centred on itself.
    model.frontend.eval()
    with torch.no_grad():
        one, m = model.frontend({k: v[:1] for k, v in x.items()}, {k: v[:1] for k, v in lens.items()})
    assert float(one[0, : int(m[0])].mean(0).norm()) > 1e-3 * float(text_norm)
    model.frontend.train()


def test_text_only_generation_is_the_frozen_llms(alm: ALM):
    q = "Name a colour."
    ids = torch.tensor([alm.layout.text_prompt_ids(q)])
    ref = alm.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=alm.tokenizer.pad_token_id)
    assert alm.generate(None, q, max_new_tokens=6) == alm.tokenizer.decode(ref[0, ids.shape[1]:],
                                                                           skip_special_tokens=True)


def test_audio_generation_uses_embeddings(alm: ALM):
    inputs = alm.build_inputs(feats(), "What do you hear?")
    n_audio = alm.audio_token_count({"enc_a": 30, "enc_b": 60})
    assert inputs["inputs_embeds"].shape[1] == len(alm.layout.prefix_ids) + n_audio + len(
        alm.layout.suffix_ids("What do you hear?"))
    assert isinstance(alm.generate(feats(), "What do you hear?", max_new_tokens=3), str)
    with pytest.raises(ValueError, match="expected"):
        alm.build_inputs({"enc_a": np.zeros((3, 10, 16)), "enc_b": np.zeros((1, 10, 8))}, "Q")


@pytest.mark.parametrize("fusion", ["crossattention", "perceiver"])
def test_export_roundtrip_without_llm_weights(llm_dir: str, tmp_path: Path, fusion: str):
    model = ALM.build(llm_dir, ENCS, adapter_hidden=32, fusion=fusion, llm_name="tiny", seed=3)
    out = export_adapter(model, str(tmp_path / "export"))
    files = sorted(p.name for p in Path(out).iterdir())
    assert files == ["adapter.json", "adapter.safetensors"]
    llm_bytes = sum(p.stat().st_size for p in Path(llm_dir).glob("*.safetensors"))
    assert (Path(out) / "adapter.safetensors").stat().st_size < llm_bytes / 4
    loaded = load_alm(out, llm=llm_dir)
    assert loaded.meta["fusion"] == fusion and loaded.meta["encoders"][1]["frame_rate"] == 100.0
    torch.testing.assert_close(loaded.embed_audio(feats()), model.eval().embed_audio(feats()))


def test_export_and_load_through_s3(llm_dir: str, s3_bucket: str):
    model = ALM.build(llm_dir, ENCS[:1], adapter="mlp", adapter_hidden=16, llm_name="tiny", seed=1)
    uri = export_adapter(model, f"{s3_bucket}/runs/x/train/export")
    loaded = load_alm(uri, llm=llm_dir)
    f = {"enc_a": feats()["enc_a"]}
    torch.testing.assert_close(loaded.embed_audio(f), model.eval().embed_audio(f))


def test_sample_average_weighs_each_answer_equally(alm: ALM):
    short = alm.encode_text("Gender?", "Male.")
    long = alm.encode_text("Describe it.", "A dog barks twice, then a car passes slowly in the rain.")
    emb, mask, labels = alm.assemble(torch.randn(2, 5, 64), torch.tensor([5, 3]), [short[0], long[0]],
                                     [short[1], long[1]])
    logits = alm.llm(inputs_embeds=emb, attention_mask=mask).logits
    per_row = [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=IGNORE)
               for i in range(2)]
    token, n_token = alm.answer_loss(emb, mask, labels, "token")
    sample, n_sample = alm.answer_loss(emb, mask, labels, "sample")
    n = [len(short[1]), len(long[1])]
    assert n_token == n_sample == sum(n)
    assert torch.allclose(sample, (per_row[0] + per_row[1]) / 2, atol=1e-5)
    assert torch.allclose(token, (per_row[0] * n[0] + per_row[1] * n[1]) / sum(n), atol=1e-5)
    assert not torch.allclose(token, sample, atol=1e-4)  # the lengths differ, so the two averages do
    with pytest.raises(ValueError, match="loss average"):
        alm.answer_loss(emb, mask, labels, "batch")
