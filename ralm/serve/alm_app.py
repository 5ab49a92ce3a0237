"""The trained ALM behind an OpenAI-compatible `/v1/chat/completions` (Ray Serve).

    svc = serve_alm(cfg, run_dir)          # adapters: cfg.eval.adapters or run_dir/train/export
    client = openai.OpenAI(base_url=svc.url, api_key="unused")
    client.chat.completions.create(model=svc.model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What do you hear?"},
        {"type": "input_audio", "input_audio": {"data": base64_wav, "format": "wav"}}]}])
    stop_alm(svc)

A request is a user message: text parts (the question) and at most one `input_audio` part (base64
wav, mp3, flac, ogg/opus, m4a/aac or webm; vLLM's `audio_url` part with a data URL works too),
optionally after system (or developer) messages, which become the prompt's system turn (ALARM trains
without one: the adapter has not seen it, the frozen LLM has). A conversation (user and assistant turns,
user last: follow-up questions about the clip) works too: one clip in all, first inside its user turn as
in training, the other turns as the LLM's chat template renders them.
Without audio the ALM answers exactly as the frozen LLM. `stream: true` answers with server-sent
`chat.completion.chunk` events as tokens are generated (`stream_options.include_usage` adds the usage
chunk). `stop` (a string or up to 4) ends the answer where one appears, left out of the text. `n` (up to
`MAX_CHOICES`) asks for several answers: sampled ones with seeds `seed`, `seed + 1`, ...; greedy ones
(temperature 0) are one answer, given n times; streamed, each answer's tokens come as they are generated,
under its choice index. Sampled choices go to the engine together, each with its own seed (vLLM samples
them in one call; the transformers back end, one after another).
Concurrent requests with the same settings (max_tokens, stop, sampling, system message), streamed or not,
are answered in one engine call (`eval.serve.max_batch_size`, `batch_wait_ms`; `GET /stats` shows the
batches a replica ran).
Limits (`eval.serve`): audio bytes (413) and seconds (400); audio that does not decode is a 400
that says why. A bad request never takes the replica down. Binds 127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ralm.eval.inference import ClientGone, backend_options
from ralm.model.chat import Dialogue, Question, check_turns
from ralm.serve.batching import Entry, MicroBatcher
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

APP_NAME = "ralm-alm"
# OpenAI's input_audio formats are wav and mp3; the others decode the same way (libsndfile, else FFmpeg).
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm")
MAX_CHOICES = 8  # `n`: each sampled choice is one more generation

api = FastAPI(title="ralm ALM")


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content=error_object(message, code, kind, param))


@dataclass
class ParsedRequest:
    question: Question  # the user's question, or a conversation (`Dialogue`) around the clip
    audio: bytes | None
    audio_format: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    system: str | None = None
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()  # strings that end the answer (left out of it)
    n: int = 1  # answers asked for


def _text_content(content: Any, param: str) -> str:
    """A message's text: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text") or "") for p in content)
    raise RequestError(400, f"{param} must be text (a string or text parts)", "invalid_request", param)


def _user_content(content: Any, i: int, max_audio_bytes: int) -> tuple[str, list[tuple[str, tuple[bytes, str]]]]:
    """A user message's text (its text parts joined) and its audio parts as (param, (bytes, format))."""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError(400, "message content must be a string or a list of content parts", "invalid_request",
                           f"messages[{i}].content")
    texts, clips = [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        param = f"messages[{i}].content[{j}]"
        if kind == "text":
            texts.append(str(part.get("text") or ""))
        elif kind in ("input_audio", "audio_url"):
            obj = part.get(kind)
            if kind == "audio_url":  # vLLM's audio part: {"audio_url": {"url": "data:audio/wav;base64,..."}}
                obj = _audio_url_part(obj, param)
            clips.append((param, _decode_audio_part(obj, max_audio_bytes, param)))
        else:
            raise RequestError(400, f"content part type {kind!r} is not supported (use text and input_audio)",
                               "unsupported", param)
    return "\n".join(t for t in texts if t).strip(), clips


def parse_request(body: Any, max_audio_bytes: int, max_new_tokens: int) -> ParsedRequest:
    """Validate an OpenAI chat request; raise RequestError (4xx) with a message a client can act on."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError(400, "messages must be a non-empty list of message objects", "invalid_request",
                           "messages")
    roles = [m.get("role") for m in messages]
    n_system = next((i for i, r in enumerate(roles) if r not in ("system", "developer")), len(roles))
    try:
        check_turns(roles[n_system:])
    except ValueError as e:
        raise RequestError(400, f"{e}, after any system messages", "invalid_request", "messages") from None
    system = "\n\n".join(_text_content(m.get("content"), f"messages[{i}].content")
                          for i, m in enumerate(messages[:n_system])) if n_system else None
    stream = body.get("stream") is True
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "stream_options must be an object", "invalid_request", "stream_options")
    unsupported = unsupported_options(body)
    if unsupported:
        raise RequestError(400, unsupported_message(unsupported), "unsupported", unsupported[0])
    try:
        n = int(body.get("n") or 1)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(400, f"n must be an integer from 1 to {MAX_CHOICES}", "invalid_request", "n")
    turn_texts: list[tuple[str, str]] = []
    audio, fmt, audio_turn = None, None, 0
    for i in range(n_system, len(messages)):
        content = messages[i].get("content")
        if roles[i] == "assistant":
            turn_texts.append(("assistant", _text_content(content, f"messages[{i}].content")))
            continue
        text, clips = _user_content(content, i, max_audio_bytes)
        for param, clip in clips:
            if audio is not None:
                raise RequestError(400, "at most one audio part per request", "unsupported", param)
            (audio, fmt), audio_turn = clip, len(turn_texts)
        turn_texts.append(("user", text))
    if not any(text for _, text in turn_texts) and audio is None:
        raise RequestError(400, "the messages have neither text nor audio", "invalid_request", "messages")
    if audio is not None and not turn_texts[audio_turn][1]:
        turn_texts[audio_turn] = ("user", "Describe the audio.")
    # One question lays out as in training; a conversation keeps the clip first in its user turn.
    question: Question = turn_texts[0][1] if len(turn_texts) == 1 else Dialogue(tuple(turn_texts), audio_turn)
    try:
        requested = body.get("max_completion_tokens") or body.get("max_tokens") or max_new_tokens
        max_tokens = min(int(requested), max_new_tokens)
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 0.0
        top_p = float(body["top_p"]) if body.get("top_p") is not None else 1.0
        seed = int(body["seed"]) if body.get("seed") is not None else 0
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"bad sampling parameter: {e}", "invalid_request") from None
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise RequestError(400, "need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1", "invalid_request")
    return ParsedRequest(question, audio, fmt, max_tokens, temperature, top_p, seed,
                         system, stream, bool(stream_options.get("include_usage")), _stop_strings(body.get("stop")), n)


def _stop_strings(stop: Any) -> tuple[str, ...]:
    try:
        return stop_strings(stop)
    except ValueError as e:
        raise RequestError(400, str(e), "invalid_request", "stop") from None


_MIME_FORMATS = {"wav": "wav", "x-wav": "wav", "wave": "wav", "vnd.wave": "wav", "mpeg": "mp3", "mp3": "mp3",
                 "flac": "flac", "x-flac": "flac", "ogg": "ogg", "opus": "opus", "mp4": "m4a", "m4a": "m4a",
                 "x-m4a": "m4a", "aac": "aac", "webm": "webm"}


def _audio_url_part(obj: Any, param: str) -> dict[str, str]:
    """An `audio_url` part as an input_audio one. Only data URLs: the server fetches nothing a client names."""
    url = obj.get("url") if isinstance(obj, dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise RequestError(400, "audio_url must be a data URL (data:audio/wav;base64,...): the server does not "
                           "fetch URLs; send the bytes (or use an input_audio part)", "invalid_audio", param)
    mime = url[len("data:"): url.index(",")].split(";")[0].lower()
    fmt = _MIME_FORMATS.get(mime.split("/", 1)[-1], "wav") if mime.startswith("audio/") else "wav"
    return {"data": url, "format": fmt}


_URLSAFE = str.maketrans("-_", "+/")


def _decode_audio_part(obj: Any, max_bytes: int, param: str) -> tuple[bytes, str]:
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), str):
        raise RequestError(400, "input_audio must be {\"data\": <base64>, \"format\": \"wav\"|\"mp3\"|...}",
                           "invalid_audio", param)
    fmt = str(obj.get("format") or "wav").lower()
    if fmt not in AUDIO_FORMATS:
        raise RequestError(400, f"input_audio format {fmt!r} is not supported; use one of {list(AUDIO_FORMATS)}",
                           "invalid_audio", param)
    data = obj["data"]
    if data.startswith("data:"):  # a data URL: keep what follows the comma
        data = data.split(",", 1)[-1]
    if len(data) * 3 // 4 > max_bytes:  # refuse before decoding a huge payload
        raise RequestError(413, f"input_audio is about {len(data) * 3 // 4 / 2**20:.1f} MB > limit "
                           f"{max_bytes / 2**20:.1f} MB", "audio_too_large", param)
    # As clients send it: wrapped at 76 columns (`base64` on the command line), URL-safe, unpadded.
    data = "".join(data.split()).translate(_URLSAFE)
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"input_audio.data is not valid base64 ({e})", "invalid_audio", param) from None
    if not raw:
        raise RequestError(400, "input_audio.data is empty", "invalid_audio", param)
    return raw, fmt


def decode_audio(raw: bytes, fmt: str, sample_rate: int, max_seconds: float) -> Any:
    """Bytes -> mono float32 at `sample_rate` through `ralm.audio.load_audio`; 4xx for bad or long audio."""
    from ralm.audio.io import AudioError, load_audio, probe

    fd, path = tempfile.mkstemp(suffix=f".{fmt}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            seconds = probe(path).duration_s
            if seconds > max_seconds:  # refuse before decoding a long clip
                raise RequestError(400, f"audio lasts {seconds:.1f} s > limit {max_seconds:g} s", "audio_too_long",
                                   "input_audio")
            wav = load_audio(path, sample_rate)
        except AudioError as e:
            raise RequestError(400, f"input_audio could not be decoded as {fmt} ({e.reason}: "
                               f"{e.detail.replace(path, '<audio>')})", "invalid_audio", "input_audio") from None
        if len(wav) == 0:
            raise RequestError(400, "input_audio has no samples", "invalid_audio", "input_audio")
        if len(wav) / sample_rate > max_seconds:
            raise RequestError(400, f"audio lasts {len(wav) / sample_rate:.1f} s > limit {max_seconds:g} s",
                               "audio_too_long", "input_audio")
        return wav
    finally:
        os.unlink(path)


def _request_failure(gen: Any) -> tuple[int, str, str, str]:
    """(status, message, code, param) of a request the engine refused on its own (finish 'error')."""
    if gen.error_code == "context_length_exceeded":
        return 400, str(gen.error), "context_length_exceeded", "messages"
    return 400, f"input_audio could not be used: {gen.error}", "invalid_audio", "input_audio"


class AnswerStream:
    """Streamed answers: each of `answers` (`answer(on_text)`, awaitable: the replica's batcher) runs from
    creation on and hands its text to `on_text` as it comes; answer k's text is choice k of the stream, or
    choices k * copies ... (k + 1) * copies - 1 when one generation stands for several (a greedy answer
    asked for n times). `await refused()` waits for the first piece of text or the first end and returns
    the Generation when the engine refused the request before any text (the handler answers with an HTTP
    error, not a stream);
    `events()` are the server-sent events as OpenAI streams them: a role chunk per choice, content chunks
    as the tokens come, each under its choice's index, a finish chunk per choice as it ends,
    the usage chunk if asked for, `[DONE]`; a failure mid-stream is an `error` event. A client that goes
    away (`events()` closed, or the `refused()` await cancelled, as Serve does when an HTTP client
    disconnects) leaves the batcher's queue, or stops its generations at the next token (in a batch: stops
    being streamed), instead of running to max_tokens for nobody."""

    def __init__(self, answers: Sequence[Callable[[Callable[[str], None]], Awaitable[Any]]], model_name: str,
                 include_usage: bool = False, copies: int = 1) -> None:
        self.out = ChunkStream(model_name)
        self.include_usage = include_usage
        self.copies = copies
        self._loop = asyncio.get_running_loop()
        # (answer k, a piece of its text), or (k, None) once answer k has ended
        self._items: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        self._first: tuple[int, str | None] | None = None
        self._gone = threading.Event()
        self._tasks = [asyncio.ensure_future(answer(partial(self._on_text, k))) for k, answer in enumerate(answers)]
        for k, task in enumerate(self._tasks):
            # after its pieces: they were queued through the loop before the task's own result landed
            task.add_done_callback(lambda _, k=k: self._items.put_nowait((k, None)))

    def _on_text(self, k: int, text: str) -> None:  # the generation thread
        if self._gone.is_set():
            raise ClientGone("the client went away")
        self._loop.call_soon_threadsafe(self._items.put_nowait, (k, text))

    def _stop(self) -> None:
        self._gone.set()
        for task in self._tasks:
            if not task.done():
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its ClientGone is expected
                task.cancel()

    def _choices(self, k: int) -> range:
        return range(k * self.copies, (k + 1) * self.copies)

    async def refused(self) -> Any | None:
        try:
            self._first = await self._items.get()
        except asyncio.CancelledError:  # the client left before the first token
            self._stop()
            raise
        k, text = self._first
        task = self._tasks[k]
        if text is None and not task.cancelled() and task.exception() is None:
            gen = task.result()
            return gen if gen.finish_reason == "error" else None
        return None

    async def events(self) -> AsyncIterator[str]:
        out, ended, gens = self.out, 0, []
        try:
            for i in range(len(self._tasks) * self.copies):
                yield out.delta({"role": "assistant", "content": ""}, index=i)
            while ended < len(self._tasks):
                if self._first is not None:  # what refused() took off the queue
                    (k, text), self._first = self._first, None
                else:
                    k, text = await self._items.get()
                if text is not None:
                    for i in self._choices(k):
                        yield out.delta({"content": text}, index=i)
                    continue
                ended += 1
                try:
                    gen = self._tasks[k].result()
                except Exception as e:
                    log.exception("ALM generation failed mid-stream")
                    yield out.error(f"generation failed: {type(e).__name__}: {e}", "engine_error")
                    break
                if gen.finish_reason == "error":
                    _, message, code, param = _request_failure(gen)
                    yield out.error(message, code, "invalid_request_error", param)
                    break
                gens.append(gen)
                for i in self._choices(k):
                    yield out.delta({}, gen.finish_reason, index=i)
            else:
                if self.include_usage:
                    yield out.usage(gens[0].prompt_tokens, sum(g.completion_tokens for g in gens) * self.copies)
            yield DONE
        finally:
            self._stop()  # when closed mid-answer, or after a failure: the other answers stop too


BatchItem = tuple[ParsedRequest, Any, Any]  # a request, its decoded audio (or None), its on_text (streamed) or None


def batch_key(item: BatchItem) -> tuple:
    """Requests answered in one engine call share their sampling settings and system turn; not their seed:
    each prompt of a call is sampled with its own."""
    req = item[0]
    return (req.system, req.max_tokens, req.stop, req.temperature, req.top_p if req.temperature > 0 else None)


def answer_batch(engine: Any, entries: Sequence[Entry[BatchItem]]) -> list[Any]:
    """One engine call for a batch of requests with the same `batch_key`, streamed ones token by token.
    A non-streamed request alone is watched token by token too, so a client that leaves stops it."""
    items = [e.item for e in entries]
    req = items[0][0]
    callbacks = [on_text for _, _, on_text in items]
    if len(entries) == 1 and callbacks[0] is None:
        gone = entries[0].gone

        def stop_when_gone(_: str) -> None:
            if gone.is_set():
                raise ClientGone("the client went away")

        callbacks = [stop_when_gone]
    return engine.generate([(audio, r.question) for r, audio, _ in items], req.max_tokens, req.temperature,
                           req.top_p, [r.seed for r, _, _ in items], system=req.system,
                           on_text=callbacks if any(callbacks) else None, stop=req.stop)


def _asks(req: ParsedRequest) -> tuple[list[ParsedRequest], int]:
    """The generations behind `n` answers, and how many answers each stands for: sampled answers are one
    generation each, with seeds seed, seed + 1, ... (choice i is what a request with seed + i gets alone);
    a greedy answer is the same every time, so it is generated once and given n times."""
    if req.n == 1:
        return [req], 1
    if req.temperature > 0:
        return [replace(req, seed=(req.seed or 0) + i, n=1) for i in range(req.n)], 1
    return [replace(req, n=1)], req.n


def answer_stream(submit: Callable[..., Awaitable[Any]], req: ParsedRequest, audio: Any, model_name: str
                  ) -> AnswerStream:
    """`req` streamed: its answers (`_asks`), each sent to the batcher as `submit(ask, audio, on_text)`."""
    asks, copies = _asks(req)
    return AnswerStream([partial(submit, ask, audio) for ask in asks], model_name, req.include_usage, copies)


# Helpers the deployment calls are defined above it: the replica failed with a NameError on one defined below.
@serve.deployment(name="ALMServer")
@serve.ingress(api)
class ALMServer:
    """Encoders + adapter(s) + frozen LLM in each replica (see `ralm.eval.inference.ALMInference`)."""

    def __init__(self, export_dirs: list[str], serve_cfg: dict, encoder_specs: list[dict], glue: str,
                 backend: str, model_name: str, options: dict | None = None) -> None:
        from ralm.config import AlmServeConfig, EncoderSpec
        from ralm.eval.inference import ALMInference

        self.cfg = AlmServeConfig.model_validate(serve_cfg)
        self.model_name = model_name
        self.engine = ALMInference(export_dirs, backend=backend, glue=glue,
                                   encoder_specs=[EncoderSpec.model_validate(s) for s in encoder_specs],
                                   backend_options={**(options or {}), "batch_size": self.cfg.max_batch_size},
                                   feature_cache_mb=self.cfg.feature_cache_mb)
        self.sample_rate = max(self.engine.sample_rates)
        self.max_audio_bytes = int(self.cfg.max_audio_mb * 2**20)
        self.batcher = MicroBatcher(partial(answer_batch, self.engine), batch_key, self.cfg.max_batch_size,
                                    self.cfg.batch_wait_ms / 1000)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/stats")
    async def stats(self) -> dict:
        """This replica's batching (batches run, requests in them, how many of each size) and its feature
        cache (clips answered without encoding them again)."""
        return {**self.batcher.stats(), "feature_cache": self.engine.feature_cache.stats()}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [model_card(self.model_name)]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> Any:
        return retrieve_model(model, self.model_name)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        try:
            try:
                body = await request.json()
            except Exception:
                raise RequestError(400, "the request body is not valid JSON", "invalid_request") from None
            req = parse_request(body, self.max_audio_bytes, self.cfg.max_new_tokens)
            audio = None
            if req.audio is not None:
                wav = await asyncio.to_thread(decode_audio, req.audio, req.audio_format or "wav", self.sample_rate,
                                              self.cfg.max_audio_seconds)
                audio = (wav, self.sample_rate)
        except RequestError as e:
            return _error(e.status, e.message, e.code, e.param)
        if req.stream:
            stream = answer_stream(self._submit, req, audio, self.model_name)
            refused = await stream.refused()
            if refused is not None:  # before any text: a plain HTTP error, as without streaming
                return _error(*_request_failure(refused))
            return StreamingResponse(stream.events(), media_type="text/event-stream")
        asks, copies = _asks(req)
        try:
            gens = await asyncio.gather(*(self._submit(ask, audio) for ask in asks))
        except Exception as e:  # the replica keeps serving; the client learns what failed
            log.exception("ALM generation failed")
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "engine_error")
        failed = next((g for g in gens if g.finish_reason == "error"), None)
        if failed is not None:
            return _error(*_request_failure(failed))
        return completion(self.model_name, [(g.text, g.finish_reason) for g in gens for _ in range(copies)],
                          gens[0].prompt_tokens, sum(g.completion_tokens for g in gens) * copies)

    def _submit(self, req: ParsedRequest, audio: Any, on_text: Callable[[str], None] | None = None) -> Awaitable[Any]:
        return self.batcher.submit((req, audio, on_text))


# ---------------------------------------------------------------------------------------------- start / stop
@dataclass
class ALMService:
    url: str  # OpenAI base URL: http://127.0.0.1:8001/v1
    model: str
    app_name: str
    handle: Any


def build_app(export_dirs: list[str], serve_cfg: Any, encoder_specs: list[Any] = (), glue: str | None = None,
              backend: str = "transformers", model_name: str = APP_NAME,
              options: dict[str, Any] | None = None) -> Any:
    """The Serve application (for `serve.run`, or a RayService's import path via a small builder).
    `options`: the back end's, `backend_options(cfg)` (how the vLLM back end starts)."""
    from ralm.cluster import runtime_env_vars
    from ralm.eval.inference import DEFAULT_GLUE

    opts = {"num_replicas": serve_cfg.num_replicas, "max_ongoing_requests": serve_cfg.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": serve_cfg.num_cpus, "num_gpus": serve_cfg.num_gpus,
                                  "runtime_env": {"env_vars": runtime_env_vars()}}}
    return ALMServer.options(**opts).bind(list(export_dirs), serve_cfg.model_dump(mode="json"),
                                          [s.model_dump(mode="json") for s in encoder_specs],
                                          glue or DEFAULT_GLUE, backend, model_name, options)


def _exported_adapters(cfg: Any, run_dir: str | None, adapters: list[str] | None) -> list[str]:
    """The adapter folders to serve, each checked here, not in the replica (where the reason would end up
    in Serve's deploy logs)."""
    from ralm import storage
    from ralm.eval.run import default_adapters
    from ralm.model.export import read_export_config

    storage.configure(cfg.storage)
    dirs = list(adapters or default_adapters(cfg, run_dir or cfg.storage.run_dir))
    for d in dirs:
        read_export_config(d)
    return dirs


def serve_alm(cfg: Any, run_dir: str | None = None, adapters: list[str] | None = None, wait_s: float = 600.0,
              app_name: str = APP_NAME) -> ALMService:
    """Start the ALM app on the connected (or a new local) Ray and wait until it answers."""
    import ray

    from ralm.cluster import init_ray

    dirs = _exported_adapters(cfg, run_dir, adapters)
    if not ray.is_initialized():
        init_ray(cfg.ray)
    s = cfg.eval.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    app = build_app(dirs, s, cfg.features.encoders, cfg.eval.ensemble_glue, cfg.eval.backend, app_name,
                    backend_options(cfg))
    handle = serve.run(app, name=app_name, route_prefix=s.route_prefix, blocking=False)
    _wait_running(app_name, wait_s)
    host, port = _proxy_address(s.host, s.port)
    return ALMService(url=f"http://{host}:{port}{s.route_prefix.rstrip('/')}/v1", model=app_name,
                      app_name=app_name, handle=handle)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for a RayService / `serve run` config on a cluster:
    `import_path: ralm.serve.alm_app:app_builder` with `args: {config: configs/alarm-4b.yaml, run_dir:
    s3://bucket/runs/x, adapters: [...], overrides: [...], model_name: ...}` (all but config optional;
    adapters default to the run's `train/export`, replicas and resources come from `eval.serve`)."""
    from ralm.config import load_config

    cfg = load_config(args.get("config", "demo"), list(args.get("overrides") or []))
    dirs = _exported_adapters(cfg, args.get("run_dir"), args.get("adapters"))
    return build_app(dirs, cfg.eval.serve, cfg.features.encoders, cfg.eval.ensemble_glue, cfg.eval.backend,
                     str(args.get("model_name") or APP_NAME), backend_options(cfg))


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's HTTP proxy really listens: an already-running Serve keeps its own host/port."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return (http.host if http.host not in ("0.0.0.0", "") else "127.0.0.1"), int(http.port)
    except Exception:  # pragma: no cover - private API moved
        return host, port


def _wait_running(app_name: str, wait_s: float) -> None:
    from ralm.cluster import wait_serve_app

    wait_serve_app(app_name, wait_s, "ALM service")


def stop_alm(svc: ALMService | str = APP_NAME, shutdown: bool = False) -> None:
    name = svc.app_name if isinstance(svc, ALMService) else svc
    from ralm.cluster import delete_serve_app

    delete_serve_app(name, shutdown)
