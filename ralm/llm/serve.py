"""Ray Serve deployment of an engine, with an OpenAI-compatible HTTP API and a handle API.

    svc = start_llm_service(cfg)          # cfg: RalmConfig (or LLMConfig); starts Serve on cfg.llm.serve.host:port
    svc.url                               # "http://127.0.0.1:8000/v1" -> openai.OpenAI(base_url=svc.url, api_key="x")
    svc.handle.chat.remote({"messages": [...], "sampling": {...}, "n": 1})   # in-cluster callers -> list[dict]
    stop_llm_service(cfg)                 # deletes the app (and Serve with shutdown=True)

`stream: true` is answered as OpenAI's server-sent chunks, token by token as the engine generates them
(vLLM; the transformers fallback sends each answer in one chunk once it is complete). `stop` (a string or
up to 4) cuts each answer at the first stop string; while streaming, text that may start one is held back.

Replicas: fixed `serve.num_replicas` or `serve.autoscaling` (min/max replicas, target ongoing requests);
`num_cpus`/`num_gpus` per replica. A replica awaits each request on its own (`engine.achat_requests`): the
vLLM engine batches continuously, so a request joins the running batch at the engine's next step instead of
waiting for a micro-batch to finish; the HTTP route and the handle share it. Errors are per request: an
over-long prompt is a 400 over HTTP and an error Completion over the handle; a dead engine fails the
replica's health check, and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ralm.llm.engines import ChatRequest, Completion, OnProgress, Sampling, StreamedText, cut_at_stop
from ralm.serve.openai_format import (
    DONE,
    ChunkStream,
    completion,
    error_object,
    model_card,
    retrieve_model,
    stop_strings,
    unsupported_message,
    unsupported_options,
)

log = logging.getLogger(__name__)

api = FastAPI(title="ralm LLM")


def _text(content: Any) -> str:
    """OpenAI content: a string or a list of parts; only text parts are meaningful to a text LLM."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _stopped(text: str, finish_reason: str, stop: tuple[str, ...]) -> tuple[str, str]:
    """An answer cut at the first stop string (OpenAI's `stop`, applied to the whole generated text, as
    vLLM does: for a reasoning model, the thinking included)."""
    cut = cut_at_stop(text, stop)
    return (text, finish_reason) if cut is None else (cut, "stop")


def _openai_error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content=error_object(message, code, kind))


def _failure(comps: list[Completion]) -> JSONResponse | None:
    """The HTTP error for a request whose answers failed (None: they did not)."""
    bad = next((c for c in comps if not c.ok), None)
    if bad is None:
        return None
    code = bad.reason or "engine_error"
    status = 400 if code in ("prompt_too_long", "bad_request") else 500
    return _openai_error(status, bad.error or code, "context_length_exceeded" if code == "prompt_too_long" else code,
                         "invalid_request_error" if status == 400 else "server_error")


def _tokens(comps: list[Completion]) -> tuple[int, int]:
    """(prompt tokens, completion tokens over every choice)."""
    return comps[0].prompt_tokens, sum(c.completion_tokens for c in comps)


@serve.deployment(name="LLMServer")
@serve.ingress(api)
class LLMServer:
    """One engine per replica."""

    def __init__(self, llm_cfg: dict, served_name: str) -> None:
        from ralm.config import LLMConfig
        from ralm.llm.engines import build_engine

        self.cfg = LLMConfig.model_validate(llm_cfg)
        self.served_name = served_name
        self.engine = build_engine(self.cfg)

    async def _answer(self, req: ChatRequest, on_text: OnProgress | None = None) -> list[Completion]:
        """One request, awaited alone: the engine batches concurrent ones (vLLM: continuous batching)."""
        try:
            return (await self.engine.achat_requests([req], on_text))[0]
        except Exception as e:  # noqa: BLE001 - engines report per-request errors; this is a last resort
            log.warning("engine call failed: %s", e)
            return [Completion.failed(f"engine_error: {type(e).__name__}: {e}") for _ in range(req.n)]

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died is restarted, not kept."""
        self.engine.check_health()

    # -------------------------------------------------------------------------------- handle API
    async def chat(self, request: dict) -> list[dict]:
        """{"messages", "sampling": {temperature, top_p, max_new_tokens, seed}, "n"} -> n Completion dicts."""
        comps = await self._answer(ChatRequest.from_dict(request))
        return [c.to_dict() for c in comps]

    async def info(self) -> dict:
        return {"model": self.served_name, "max_model_len": self.engine.max_model_len, "engine": self.engine.name}

    async def count_tokens(self, messages: list[dict]) -> int:
        return self.engine.count_tokens(messages)

    async def nll(self, conversations: list[list[dict]], targets: list[str]) -> list[float]:
        return await asyncio.to_thread(self.engine.nll, conversations, targets)

    # -------------------------------------------------------------------------------- OpenAI HTTP API
    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [model_card(self.served_name, max_model_len=self.engine.max_model_len)]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> Any:
        return retrieve_model(model, self.served_name, max_model_len=self.engine.max_model_len)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        try:
            body = await request.json()
            unsupported = unsupported_options(body)
            if unsupported:
                return _openai_error(400, unsupported_message(unsupported), "unsupported")
            messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
            if not messages:
                raise ValueError("messages is empty")
            stream = body.get("stream") is True
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.cfg.max_model_len
            sampling = Sampling(
                temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
                top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                max_new_tokens=int(max_tokens),
                seed=body.get("seed"),
            )
            n = int(body.get("n") or 1)
            if n < 1 or sampling.max_new_tokens < 1:
                raise ValueError("n and max_tokens must be >= 1")
            stop = stop_strings(body.get("stop"))
        except (KeyError, TypeError, ValueError) as e:
            return _openai_error(400, f"malformed request: {e}", "invalid_request")
        req = ChatRequest(messages, sampling, n)
        if stream:
            return await self._stream(req, stop, include_usage)
        comps = await self._answer(req)
        failed = _failure(comps)
        if failed is not None:
            return failed
        answers = [_stopped(c.text, c.finish_reason, stop) for c in comps]
        return completion(self.served_name, answers, *_tokens(comps))

    async def _stream(self, req: ChatRequest, stop: tuple[str, ...], include_usage: bool) -> Any:
        """Stream the answers as the engine reports them. Until the first piece of text, a failure (e.g. a
        prompt over the context limit) is still an HTTP error; after it, an error event ends the stream."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

        def on_text(_request: int, sample: int, text: str) -> None:  # called on the engine's thread
            loop.call_soon_threadsafe(updates.put_nowait, (sample, text))

        task = asyncio.ensure_future(self._answer(req, on_text))
        first = asyncio.ensure_future(updates.get())
        await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():  # answered before any progress (a backend that reports none)
            first.cancel()
            comps = task.result()
            failed = _failure(comps)
            if failed is not None:
                return failed
            answers = [_stopped(c.text, c.finish_reason, stop) for c in comps]
            return StreamingResponse(ChunkStream(self.served_name).whole(answers, include_usage, *_tokens(comps)),
                                     media_type="text/event-stream")
        return StreamingResponse(self._events(req.n, task, updates, first.result(), stop, include_usage),
                                 media_type="text/event-stream")

    async def _events(self, n: int, task: asyncio.Future, updates: asyncio.Queue, first: tuple[int, str],
                      stop: tuple[str, ...], include_usage: bool) -> AsyncIterator[str]:
        chunks = ChunkStream(self.served_name)
        texts = [StreamedText(stop) for _ in range(n)]
        started: set[int] = set()

        def pieces(sample: int, text: str, final: bool = False) -> list[str]:
            out = []
            if sample not in started:  # each choice opens with its role
                started.add(sample)
                out.append(chunks.delta({"role": "assistant", "content": ""}, index=sample))
            piece = texts[sample].advance(text, final)
            if piece:
                out.append(chunks.delta({"content": piece}, index=sample))
            return out

        try:
            pending = [first]
            while True:
                for sample, text in pending:
                    for event in pieces(sample, text):
                        yield event
                if task.done() and updates.empty():
                    break
                get = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, get}, return_when=asyncio.FIRST_COMPLETED)
                pending = [get.result()] if get.done() else []
                if not get.done():
                    get.cancel()
                while not updates.empty():
                    pending.append(updates.get_nowait())
            comps = task.result()
            bad = next((c for c in comps if not c.ok), None)
            if bad is not None:
                yield chunks.error(bad.error or "engine_error", bad.reason or "engine_error")
                yield DONE
                return
            for sample, c in enumerate(comps):  # the final text: what the stream held back, then the end
                text, finish = _stopped(c.text, c.finish_reason, stop)
                for event in pieces(sample, text, final=True):
                    yield event
                yield chunks.delta({}, finish, index=sample)
            if include_usage:
                yield chunks.usage(*_tokens(comps))
            yield DONE
        finally:
            if not task.done():  # the client went away: vLLM stops computing the request
                task.cancel()


# ---------------------------------------------------------------------------------------------- start / stop
@dataclass
class LLMService:
    url: str  # OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    handle: Any  # DeploymentHandle of LLMServer
    app_name: str


def _llm_cfg(cfg: Any) -> Any:
    return getattr(cfg, "llm", cfg)


def deployment_options(llm_cfg: Any) -> dict[str, Any]:
    """Serve options from config: replicas (fixed or autoscaling) and per-replica resources."""
    s = llm_cfg.serve
    from ralm.cluster import runtime_env_vars

    verbose = bool(os.environ.get("RALM_VERBOSE"))
    env = runtime_env_vars()
    # vLLM's start-up INFO lines (~15 per replica) bury the stage's progress bar; its warnings stay.
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": {"env_vars": env}},
        "health_check_period_s": 10,
        # One access-log line per request drowns the stage's progress bar; RALM_VERBOSE=1 brings it back.
        "logging_config": {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose},
    }
    if s.autoscaling is not None:
        a = s.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(a.min_replicas, 1),
                                      "target_ongoing_requests": a.target_ongoing_requests,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def build_app(cfg: Any) -> Any:
    """The Serve application (for `serve.run` or a RayService config's import path)."""
    llm_cfg = _llm_cfg(cfg)
    return LLMServer.options(**deployment_options(llm_cfg)).bind(llm_cfg.model_dump(mode="json"),
                                                                 llm_cfg.serve.app_name)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for a RayService / `serve run` config:
    `import_path: ralm.llm.serve:app_builder` with `args: {config: configs/alarm-4b.yaml, overrides: [...]}`."""
    from ralm.config import load_config

    return build_app(load_config(args.get("config", "demo"), list(args.get("overrides") or [])))


def start_llm_service(cfg: Any, wait_s: float = 600.0) -> LLMService:
    """Start (or update) the LLM app on the connected Ray (init_ray first) and wait until it is running."""
    import ray

    from ralm.cluster import init_ray

    if not ray.is_initialized():
        init_ray(getattr(cfg, "ray", None))
    llm_cfg = _llm_cfg(cfg)
    s = llm_cfg.serve
    # Resolve (and convert, once) the model on the driver so replicas don't race on the first conversion.
    from ralm.llm.models import resolve_model

    resolve_model(llm_cfg.model, allow_network=llm_cfg.allow_network)
    serve.start(http_options={"host": s.host, "port": s.port})
    handle = serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    _wait_running(s.app_name, wait_s)
    prefix = s.route_prefix.rstrip("/")
    return LLMService(url=f"http://{s.host}:{s.port}{prefix}/v1", handle=handle, app_name=s.app_name)


def _wait_running(app_name: str, wait_s: float) -> None:
    from ralm.cluster import wait_serve_app

    wait_serve_app(app_name, wait_s, "LLM service")


def get_llm_handle(cfg: Any) -> Any:
    """Handle of a running LLM app (in-cluster callers, e.g. Ray Data actors)."""
    return serve.get_app_handle(_llm_cfg(cfg).serve.app_name)


def stop_llm_service(cfg: Any | None = None, shutdown: bool = False) -> None:
    """Delete the LLM app (all its replicas); `shutdown=True` also stops Serve's proxies/controller."""
    name = _llm_cfg(cfg).serve.app_name if cfg is not None else "ralm-llm"
    from ralm.cluster import delete_serve_app

    delete_serve_app(name, shutdown)
