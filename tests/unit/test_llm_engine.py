"""The transformers engine on the tiny random Llama: chat, limits, thinking budget, NLL (no Ray)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from ralm.config import LLMConfig
from ralm.llm import thinking
from ralm.llm.engines import Completion, Sampling, build_engine

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}
CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a sound."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ralm.llm.models import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="module")
def thinking_tiny(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a reasoning-style template that opens the thought in the prompt (like
    Qwen3-Thinking): the random model never closes it, so the budget must."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-thinking")
    for f in Path(tiny).iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(tiny)
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert "<think>" in tok.chat_template
    tok.save_pretrained(out)
    return str(out)


def _engine(path: str, **kw):
    data = {"model": path, "engine": "transformers", "max_model_len": 128, "dtype": "float32",
            "thinking": {"budget_tokens": None}}
    data.update(kw)
    return build_engine(LLMConfig.model_validate(data))


@pytest.fixture(scope="module")
def engine(tiny: str):
    return _engine(tiny)


def test_tiny_model_shape(tiny: str):
    from transformers import AutoConfig, AutoTokenizer

    c = AutoConfig.from_pretrained(tiny)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (64, 2, 4)
    assert (Path(tiny) / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(tiny).chat_template


def test_chat_greedy_is_deterministic_and_counts_tokens(engine):
    a = engine.chat([CONV, CONV], GREEDY)
    assert len(a) == 2 and all(len(x) == 1 for x in a)
    c = a[0][0]
    assert isinstance(c, Completion) and c.ok and c.finish_reason in ("stop", "length")
    assert c.prompt_tokens == engine.count_tokens(CONV) and 1 <= c.completion_tokens <= 6
    assert a[0][0].text == a[1][0].text
    assert engine.chat([CONV], GREEDY)[0][0].text == c.text


def test_n_samples_and_seed(engine):
    s = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=7)
    one = engine.chat([CONV], s, n=3)[0]
    assert len(one) == 3
    assert [c.text for c in engine.chat([CONV], s, n=3)[0]] == [c.text for c in one]


def test_over_long_prompt_is_an_error_result_not_an_exception(engine):
    long = [{"role": "user", "content": "word " * 300}]
    out = engine.chat([CONV, long, CONV], GREEDY, n=2)
    assert [len(x) for x in out] == [2, 2, 2]
    bad = out[1][0]
    assert not bad.ok and bad.finish_reason == "error" and bad.reason == "prompt_too_long"
    assert bad.error.startswith("prompt_too_long: ") and "> limit 127" in bad.error
    assert out[0][0].ok and out[2][0].ok


def test_max_new_tokens_capped_by_context(engine):
    conv = [{"role": "user", "content": "word " * 90}]
    room = engine.max_model_len - engine.count_tokens(conv)
    c = engine.chat([conv], {"temperature": 0.0, "max_new_tokens": 500})[0][0]
    assert room >= 1 and c.ok and c.completion_tokens <= room


@pytest.fixture
def with_thinking(engine):
    """Swap the engine's thinking config for one test (engines are slow-ish to build)."""
    from ralm.config import ThinkingConfig

    saved = engine.thinking

    def use(eng, **kw):
        eng.thinking = ThinkingConfig(**kw)
        return eng

    yield use
    engine.thinking = saved


def test_thinking_budget_force_closes_the_thought(thinking_tiny: str):
    cfg = {"budget_tokens": 5, "force_close_text": "\nTime to answer.\n", "close_tag": "</think>"}
    eng = _engine(thinking_tiny, thinking=cfg)
    c = eng.chat([CONV], {"temperature": 0.0, "max_new_tokens": 30})[0][0]
    assert c.ok and c.forced_close
    assert "Time to answer.\n</think>" in c.text
    thought, answer = thinking.split_thought(c.text, eng.thinking)
    assert thought is not None and "Time to answer." in thought
    inject = len(eng.tokenizer.encode("\nTime to answer.\n</think>", add_special_tokens=False))
    assert c.completion_tokens <= 30
    if c.finish_reason == "length":  # phase 2 used the whole remaining budget
        assert c.completion_tokens == 30
    assert c.completion_tokens > 5 + inject or c.finish_reason == "stop"
    # Without a budget the same model just runs to max_new_tokens.
    eng.thinking = eng.thinking.model_copy(update={"budget_tokens": None})
    plain = eng.chat([CONV], {"temperature": 0.0, "max_new_tokens": 30})[0][0]
    assert not plain.forced_close and "Time to answer." not in plain.text


def test_budget_does_not_touch_a_model_that_is_not_thinking(engine, with_thinking):
    ref = engine.chat([CONV], {"temperature": 0.0, "max_new_tokens": 12})[0][0]
    c = with_thinking(engine, budget_tokens=4).chat([CONV], {"temperature": 0.0, "max_new_tokens": 12})[0][0]
    assert not c.forced_close and c.completion_tokens == ref.completion_tokens
    assert c.text.replace(" ", "") == ref.text.replace(" ", "")  # two-phase continuation, same greedy path


def test_ask_to_think_adds_instruction(engine, with_thinking):
    base = engine.count_tokens(CONV)
    assert with_thinking(engine, ask_to_think=True, budget_tokens=None).count_tokens(CONV) > base
    msgs = thinking.ask_to_think([{"role": "user", "content": "q"}], engine.thinking)
    assert msgs[0]["role"] == "system" and "<think>" in msgs[0]["content"] and "</think>" in msgs[0]["content"]


def test_split_thought_and_open():
    cfg = LLMConfig().thinking
    assert thinking.split_thought("<think>a b</think> answer", cfg) == ("a b", "answer")
    assert thinking.split_thought("a b</think> answer", cfg) == ("a b", "answer")  # opened by the template
    assert thinking.split_thought("<think>never closed", cfg) == ("never closed", "")
    assert thinking.split_thought("just an answer", cfg) == (None, "just an answer")
    assert thinking.thought_open("x <think> y", cfg) and not thinking.thought_open("<think>y</think>z", cfg)


def test_nll_matches_manual_forward(engine):
    import torch

    target = "A dog barks twice."
    nll = engine.nll([CONV, CONV, CONV], [target, "", "word " * 200])
    assert nll[0] > 0 and math.isnan(nll[1]) and math.isnan(nll[2])
    prompt = engine.render(CONV)
    tgt = engine.tokenizer.encode(target, add_special_tokens=False)
    ids = torch.tensor([prompt + tgt])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(ids).logits[0].float(), -1)
    manual = -sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(tgt)) / len(tgt)
    assert nll[0] == pytest.approx(manual, rel=1e-4)


def test_completion_roundtrip_and_sampling_of():
    c = Completion.failed("timeout: 300 s", prompt_tokens=3)
    assert Completion.from_dict(c.to_dict()) == c and c.reason == "timeout"
    from ralm.config import SamplingConfig

    s = Sampling.of(SamplingConfig(temperature=0.2, max_new_tokens=9, seed=4))
    assert (s.temperature, s.max_new_tokens, s.seed) == (0.2, 9, 4)
    assert Sampling.of({"max_tokens": 5}).max_new_tokens == 5


def test_resolve_model_refuses_hub_ids(tmp_path: Path):
    from ralm.llm.models import ModelNotAvailableError, resolve_model

    with pytest.raises(ModelNotAvailableError, match="Qwen/Qwen3-4B-Thinking-2507.*nothing downloads"):
        resolve_model("Qwen/Qwen3-4B-Thinking-2507")
    assert resolve_model("Qwen/Qwen3-4B-Thinking-2507", allow_network=True) == "Qwen/Qwen3-4B-Thinking-2507"
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        resolve_model(str(tmp_path / "notamodel"))


def test_unknown_engine_is_a_clear_error(tiny: str):
    with pytest.raises(Exception, match="engine"):
        build_engine(LLMConfig.model_validate({"model": tiny, "engine": "nope"}))
