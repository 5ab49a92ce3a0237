"""The transformers engine on the tiny random Llama: chat, limits, thinking budget, NLL (no Ray)."""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections import defaultdict
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


def _convs(k: int) -> list[list[dict]]:
    return [[{"role": "user", "content": "Name a sound " + "and another " * j + "."}] for j in range(k)]


def test_concurrent_requests_are_decoded_together_and_answer_as_each_alone(engine, monkeypatch):
    """A Serve replica gets its requests one per call from many threads: requests queued while the model
    is busy are decoded in shared batches (greedy ones in one, sampled ones in another), each answering
    what it answers alone, sampled ones drawing from their own seeds."""
    from concurrent.futures import ThreadPoolExecutor

    sampled = [Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=s) for s in (1, 2, 1)]
    jobs = [(c, GREEDY, 1) for c in _convs(4)] + [(c, s, 2) for c, s in zip(_convs(3), sampled, strict=True)]
    alone = [engine.chat([c], s, n=n)[0] for c, s, n in jobs]
    calls, busy = [], threading.Event()
    generate = engine.model.generate

    def first_waits_for_the_rest(*a, **kw):
        calls.append(a[0].shape[0])
        if len(calls) == 1:  # the model is busy with a first request while all the others arrive
            busy.set()
            deadline = time.monotonic() + 120  # a guard, not a timing: a thread that died never queues
            while engine._queue.qsize() < len(jobs) and time.monotonic() < deadline:
                time.sleep(0.01)
        return generate(*a, **kw)

    monkeypatch.setattr(engine.model, "generate", first_waits_for_the_rest)
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        first = pool.submit(engine.chat, [CONV], GREEDY)
        busy.wait(120)
        futures = [pool.submit(engine.chat, [c], s, n) for c, s, n in jobs]
        together = [f.result()[0] for f in futures]
    assert first.result()[0][0].ok
    assert sorted(calls[1:]) == [4, 6] and calls[0] == 1  # 4 greedy prompts in one batch, 3 sampled x 2 in another
    assert [[c.text for c in x] for x in together] == [[c.text for c in x] for x in alone]
    assert together[4][0].text == together[6][0].text and together[4][0].text != together[4][1].text  # seeds
    assert all(c.ok and c.completion_tokens >= 1 for x in together for c in x)


def test_a_batch_that_fails_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    real, failures = engine._decode_rows, [RuntimeError("out of memory")]

    def decode(rows, *a):
        if failures:
            raise failures.pop()
        return real(rows, *a)

    monkeypatch.setattr(engine, "_decode_rows", decode)
    bad = engine.chat([CONV, CONV], GREEDY)
    assert [c.reason for x in bad for c in x] == ["engine_error"] * 2 and "out of memory" in bad[0][0].error
    assert engine.chat([CONV], GREEDY)[0][0].ok  # the decoding thread lives on


def test_streamed_requests_report_their_text_after_each_step(engine):
    """`achat_requests(on_text=...)` on the transformers engine: every sample's text grows a piece at a time
    to its final answer (greedy copies alike), requests in one batch reported apart."""
    import asyncio

    from ralm.llm.engines import ChatRequest

    seen: dict[tuple[int, int], list[str]] = defaultdict(list)
    reqs = [ChatRequest(CONV, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3), 2),
            ChatRequest(_convs(2)[1], Sampling.of({"temperature": 0.0, "max_new_tokens": 10}), 2)]
    out = asyncio.run(engine.achat_requests(reqs, on_text=lambda i, j, text: seen[(i, j)].append(text)))
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (i, j), texts in seen.items():
        final = out[i][j].text
        assert all(final.startswith(t) for t in texts) and texts == sorted(set(texts), key=len)  # grows
        assert texts[-1] == final and len(texts) >= 2  # token by token, not the whole answer at the end
    assert seen[(1, 0)] == seen[(1, 1)]


def test_close_answers_what_is_queued_then_refuses(tiny: str):
    from ralm.llm.engines import GenRequest

    eng = _engine(tiny)
    closing = threading.Thread(target=eng.close)
    with eng._lock:  # busy: the requests wait while close() is called
        queued = eng._submit([GenRequest([1, 2, 3], 3, 0.0, 1.0, None), GenRequest([4, 5], 3, 0.0, 1.0, None)])
        closing.start()
        deadline = time.monotonic() + 120  # a guard, not a timing
        while not eng._closed and time.monotonic() < deadline:
            time.sleep(0.01)
    closing.join(120)
    assert not closing.is_alive()
    assert all(f.result(timeout=1)[0].finish_reason in ("stop", "length") for f in queued)  # answered first
    with pytest.raises(RuntimeError, match="engine is closed"):
        eng.chat([CONV], GREEDY)


def test_a_batch_never_runs_a_row_past_its_context(engine):
    """A batch decodes for its longest max_tokens: a row is put with others only where its prompt plus that
    still fits the model (positions past it would be garbage, or an index error in learned embeddings)."""
    from ralm.llm.engines.transformers import _Row

    limit, width = engine.max_model_len, engine.max_batch_rows
    rows = [_Row(0, [1] * 10, limit - 10, None), _Row(1, [1] * 100, 20, None)]
    assert [[r.request for r in b] for b in engine._batches(rows)] == [[0], [1]]
    rows = [_Row(0, [1] * 10, 20, None), _Row(1, [1] * 100, 20, None)]
    assert [[r.request for r in b] for b in engine._batches(rows)] == [[0, 1]]
    many = [_Row(i, [1] * 5, 5, None) for i in range(width + 3)]
    assert [len(b) for b in engine._batches(many)] == [width, 3]


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


# ---------------------------------------------------------------------------------------------- vLLM step loop
class _FakeVLLM:
    """Stands in for vllm.LLM: `llm_engine` finishes request r after `params` steps (an int), raises on
    params "bad", and crashes at step `crash_at`."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.llm_engine = self
        self.left: dict[str, int] = {}
        self.steps, self.crash_at, self.aborted = 0, crash_at, []

    def add_request(self, rid, prompt, params):
        if params == "bad":
            raise ValueError("bad params")
        assert prompt == {"prompt_token_ids": [1, 2]}
        self.left[rid] = params

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def abort_request(self, ids):
        self.aborted += ids
        for i in ids:
            self.left.pop(i, None)

    def step(self):
        import time
        from types import SimpleNamespace

        self.steps += 1
        if self.steps == self.crash_at:
            raise RuntimeError("boom")
        time.sleep(0.002)
        out = []
        for rid in list(self.left):
            self.left[rid] -= 1
            out.append(SimpleNamespace(request_id=rid, finished=self.left[rid] == 0))
            if self.left[rid] == 0:
                del self.left[rid]
        return out


def test_step_loop_joins_running_batch_and_isolates_errors():
    from concurrent.futures import CancelledError

    from ralm.llm.engines.vllm import EngineDied, StepLoop

    fake = _FakeVLLM()
    loop = StepLoop(fake)
    try:
        long = loop.submit([1, 2], 400)
        while not fake.left:
            pass
        short, bad = loop.submit([1, 2], 3), loop.submit([1, 2], "bad")
        assert short.result(timeout=10).request_id == short.request_id
        assert isinstance(bad.exception(timeout=10), ValueError)  # that request alone
        assert not long.done()  # the short one joined the running batch and finished first
        assert long.result(timeout=30).finished
        # A cancelled caller's request is aborted in the engine.
        gone = loop.submit([1, 2], 10_000)
        while gone.request_id not in fake.left:
            pass
        loop.abort([gone])
        with pytest.raises(CancelledError):
            gone.result(timeout=10)
        assert fake.aborted == [gone.request_id]
    finally:
        loop.close()
    assert isinstance(loop.submit([1, 2], 1).exception(timeout=1), EngineDied)  # closed: fails at once


def test_step_loop_crash_fails_pending_and_later_requests():
    from ralm.llm.engines.vllm import EngineDied, StepLoop

    loop = StepLoop(_FakeVLLM(crash_at=5))
    pending = [loop.submit([1, 2], 100) for _ in range(3)]
    for f in pending:  # an error, not a hang
        assert isinstance(f.exception(timeout=10), EngineDied) and "boom" in str(f.exception())
    assert isinstance(loop.submit([1, 2], 1).exception(timeout=1), EngineDied)
    assert isinstance(loop.error, RuntimeError)


def test_step_loop_close_fails_requests_queued_behind_it():
    """Requests drained in the same batch as `close()`'s stop message are failed too, never left waiting."""
    from ralm.llm.engines.vllm import EngineDied, StepLoop

    fake = _FakeVLLM()
    loop = StepLoop(fake, gather_s=0.2)  # the idle loop gathers: stop and the adds behind it come together
    first = loop.submit([1, 2], 1)
    loop.close(timeout_s=0)
    late = [loop.submit([1, 2], 1) for _ in range(3)]
    loop._thread.join(10)
    assert not loop._thread.is_alive()
    for f in [first, *late]:
        assert f.exception(timeout=5) is None or isinstance(f.exception(), EngineDied)
    assert all(isinstance(f.exception(), EngineDied) for f in late)


def test_backend_error_fails_only_its_request(engine, monkeypatch):
    """A backend may return an exception in place of one request's outputs: that request alone becomes
    engine_error Completions, on the blocking and the coroutine path."""
    import asyncio

    from ralm.llm.engines import ChatRequest

    real, areal = engine._generate, engine._agenerate

    def gen(reqs):
        outs = real(reqs)
        outs[1] = RuntimeError("kaput")
        return outs

    async def agen(reqs, progress=None):
        outs = await areal(reqs, progress)
        outs[1] = RuntimeError("kaput")
        return outs

    monkeypatch.setattr(engine, "_generate", gen)
    monkeypatch.setattr(engine, "_agenerate", agen)
    out = engine.chat([CONV, CONV, CONV], GREEDY, n=2)
    assert out[0][0].ok and out[2][1].ok
    assert [c.reason for c in out[1]] == ["engine_error"] * 2 and "RuntimeError: kaput" in out[1][0].error
    out = asyncio.run(engine.achat_requests([ChatRequest(CONV, Sampling.of(GREEDY), 1)] * 3))
    assert out[0][0].ok and out[1][0].reason == "engine_error" and out[2][0].ok


def test_vllm_runs_bf16_on_cpu_only_where_the_cpu_has_bf16_instructions():
    from ralm.llm.engines.vllm import engine_dtype

    with open("/proc/cpuinfo") as f:  # the kernel's view of the CPU, read here independently
        words = f.read().split()
    native = any(w in ("avx512_bf16", "amx_bf16", "bf16") for w in words)
    assert engine_dtype("auto", gpu=False) == ("bfloat16" if native else "float32")
    assert engine_dtype("auto", gpu=True) == "auto"  # the checkpoint's dtype on a GPU
    assert engine_dtype("bfloat16", gpu=False) == "bfloat16"  # an explicit choice is kept


def test_vllm_takes_the_configured_gpu_share_or_what_is_left_of_it():
    from ralm.llm.engines.vllm import gpu_share

    gib = 1 << 30
    assert gpu_share(0.9, free_bytes=79 * gib, total_bytes=80 * gib) == 0.9  # a GPU of its own
    # An ALM replica's encoders and HF copy of the LLM hold 20 GiB already: vLLM would refuse 0.9 x 80 GiB.
    share = gpu_share(0.9, free_bytes=60 * gib, total_bytes=80 * gib)
    assert share < 0.9 and share * 80 * gib <= 60 * gib - gib
    with pytest.raises(RuntimeError, match="GPU memory free"):
        gpu_share(0.9, free_bytes=gib, total_bytes=80 * gib)
