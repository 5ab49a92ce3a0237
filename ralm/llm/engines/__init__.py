"""LLM engines behind one small interface, selected by `cfg.llm.engine` from the `ENGINES` registry.

    engine = build_engine(cfg.llm)                     # vllm (CPU or CUDA, one code path) or transformers
    outs = engine.chat(conversations, cfg.generation.sampling, n=2)   # list (per conversation) of n Completions
    outs[0][0].text, .finish_reason ("stop" | "length" | "error"), .error ("prompt_too_long: ..."), .ok
    engine.count_tokens(messages); engine.max_model_len
    engine.nll(conversations, targets)                 # mean per-token NLL of each target as the reply

Everything a backend does not have to know lives here: chat-template rendering, the context-limit check
(an over-long prompt becomes an error Completion, never an exception that kills the batch), `ask_to_think`,
and the thinking budget (two-phase generation, see `thinking.py`). Backends implement two primitives on
token ids: `_generate(requests)` and `_prompt_logprobs(sequences)`; a backend with its own scheduler
(vLLM: continuous batching) also overrides `_agenerate`, so that `await engine.achat_requests([req])` from
many concurrent callers (a Serve replica: one per request) joins one running batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ralm.llm import thinking

log = logging.getLogger(__name__)

FinishReason = str  # "stop" | "length" | "error"


@dataclass
class Completion:
    """One generated reply. `error` is `"<reason>: <detail>"` when finish_reason == "error"; reasons:
    prompt_too_long, engine_error, timeout, replica_died (the last two come from the batch client)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    error: str | None = None
    forced_close: bool = False  # the thinking budget force-closed the thought

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"

    @property
    def reason(self) -> str | None:
        """The short reject reason (`prompt_too_long`, `timeout`, ...) or None when ok."""
        return None if self.ok else (self.error or "engine_error").split(":", 1)[0]

    @classmethod
    def failed(cls, error: str, prompt_tokens: int = 0) -> Completion:
        return cls(text="", prompt_tokens=prompt_tokens, finish_reason="error", error=error)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Completion:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Sampling:
    """Plain, picklable sampling parameters. `Sampling.of` accepts a SamplingConfig, a dict or a Sampling."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int | None = 0

    @classmethod
    def of(cls, obj: Any) -> Sampling:
        if isinstance(obj, Sampling):
            return obj
        if obj is None:
            return cls()
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        return cls(
            temperature=float(get("temperature", 0.7)),
            top_p=float(get("top_p", 0.95)),
            max_new_tokens=int(get("max_new_tokens", None) or get("max_tokens", None) or 512),
            seed=get("seed", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChatRequest:
    """One conversation to answer n times (the unit Serve batches and the client sends)."""

    messages: list[dict]
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "sampling": self.sampling.to_dict(), "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatRequest:
        return cls(messages=list(d["messages"]), sampling=Sampling.of(d.get("sampling")), n=int(d.get("n", 1)))


@dataclass
class GenRequest:
    """Backend primitive: continue `prompt_ids` for up to max_tokens, n samples."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    n: int = 1


@dataclass
class GenOutput:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"


# ---------------------------------------------------------------------------------------------- base
class Engine:
    """Base engine: chat template, limits, thinking. Subclasses set `self.tokenizer`, `self.max_model_len`
    in `__init__` and implement `_generate` and `_prompt_logprobs`."""

    name: ClassVar[str] = "base"
    tokenizer: Any
    max_model_len: int

    def __init__(self, llm_cfg: Any, model_path: str) -> None:
        self.cfg = llm_cfg
        self.model_path = model_path
        self.thinking = getattr(llm_cfg, "thinking", None)
        # Fast tokenizers may fail ("Already borrowed") when threads share one; Serve calls from threads.
        self._tok_lock = threading.RLock()

    # -------------------------------------------------------------------------------- backend primitives
    def _generate(self, requests: Sequence[GenRequest]) -> list[list[GenOutput] | BaseException]:
        """Per request its n outputs, or the exception that failed that request alone."""
        raise NotImplementedError

    def _prompt_logprobs(self, sequences: Sequence[list[int]], start: Sequence[int]) -> list[list[float]]:
        """Log-probabilities of tokens sequences[i][start[i]:] given everything before them."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (subclasses free memory / processes)."""

    # -------------------------------------------------------------------------------- rendering
    def prepare_messages(self, messages: list[dict]) -> list[dict]:
        if self.thinking is not None and getattr(self.thinking, "ask_to_think", False):
            return thinking.ask_to_think(messages, self.thinking)
        return messages

    def render(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat-templated prompt, ready for the assistant's reply."""
        with self._tok_lock:
            ids = self.tokenizer.apply_chat_template(
                self.prepare_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding regardless
            ids = ids["input_ids"]
        return list(ids)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.render(messages))

    # -------------------------------------------------------------------------------- chat
    def chat(self, conversations: Sequence[list[dict]], sampling: Any = None, n: int = 1) -> list[list[Completion]]:
        s = Sampling.of(sampling)
        return self.chat_requests([ChatRequest(list(c), s, n) for c in conversations])

    def chat_requests(self, requests: Sequence[ChatRequest]) -> list[list[Completion]]:
        """Answer requests with possibly different sampling, blocking."""
        results, plans, phase1 = self._plan(requests)
        if phase1:
            cont, where = self._finish(requests, plans, self._generate(phase1), results)
            if cont:
                self._merge(results, where, self._generate(cont))
        return [r if r is not None else [] for r in results]

    async def achat_requests(self, requests: Sequence[ChatRequest],
                             on_text: OnProgress | None = None) -> list[list[Completion]]:
        """`chat_requests` for an event loop (a Serve replica): the same steps, awaiting `_agenerate`.
        `on_text(request, sample, text so far)` follows the answers while they are generated, on backends that
        can (vLLM, transformers; it is called from the engine's thread); the returned Completions are the final word."""
        results, plans, phase1 = self._plan(requests)
        if phase1:
            progress1 = None if on_text is None else [_sample_progress(on_text, i) for i, *_ in plans]
            cont, where = self._finish(requests, plans, await self._agenerate(phase1, progress1), results)
            if cont:
                # A continuation's text follows its sample's phase-1 text and the injected thought close.
                progress2 = None if on_text is None else [_sample_progress(on_text, i, j, results[i][j].text)
                                                          for i, j, *_ in where]
                self._merge(results, where, await self._agenerate(cont, progress2))
        return [r if r is not None else [] for r in results]

    async def _agenerate(self, requests: Sequence[GenRequest], progress: Sequence[SampleProgress | None] | None = None
                         ) -> list[list[GenOutput] | BaseException]:
        """Backends without their own scheduler run `_generate` on a worker thread (they serialise calls);
        they report no `progress` (per request: `(sample, text so far)`), only the final outputs."""
        return await asyncio.to_thread(self._generate, requests)

    def check_health(self) -> None:
        """Raise if the engine can no longer serve (a Serve replica's health check calls this)."""

    def _plan(self, requests: Sequence[ChatRequest]):
        """Render, check the context limit, and build phase 1 (the thinking budget caps it)."""
        results: list[list[Completion] | None] = [None] * len(requests)
        plans: list[tuple[int, list[int], int, bool]] = []  # (request index, prompt ids, max_new, two-phase)
        phase1: list[GenRequest] = []
        budget = getattr(self.thinking, "budget_tokens", None) if self.thinking is not None else None
        for i, req in enumerate(requests):
            try:
                ids = self.render(req.messages)
            except Exception as e:  # a malformed conversation fails alone
                results[i] = [Completion.failed(f"bad_request: {type(e).__name__}: {e}") for _ in range(req.n)]
                continue
            room = self.max_model_len - len(ids)
            if room < 1:
                err = f"prompt_too_long: {len(ids)} tokens > limit {self.max_model_len - 1}"
                results[i] = [Completion.failed(err, len(ids)) for _ in range(req.n)]
                continue
            max_new = min(req.sampling.max_new_tokens, room)
            two_phase = budget is not None and budget < max_new
            s = req.sampling
            plans.append((i, ids, max_new, two_phase))
            phase1.append(GenRequest(ids, budget if two_phase else max_new, s.temperature, s.top_p, s.seed, req.n))
        return results, plans, phase1

    def _finish(self, requests, plans, outs1, results) -> tuple[list[GenRequest], list[tuple[int, int, str, int]]]:
        """Completions from phase 1; for the thinking budget, the phase-2 requests: force-close open
        thoughts, then continue to the answer. A backend may put an exception in place of a request's
        outputs: that request alone becomes `engine_error` Completions."""
        cfg = self.thinking
        cont: list[GenRequest] = []
        where: list[tuple[int, int, str, int]] = []  # (request idx, sample idx, injected text, injected tokens)
        for (i, ids, max_new, two_phase), outs in zip(plans, outs1, strict=True):
            s = requests[i].sampling
            if isinstance(outs, BaseException):
                results[i] = [Completion.failed(_engine_error(outs), len(ids)) for _ in range(requests[i].n)]
                continue
            comps = [Completion(o.text, len(ids), len(o.token_ids), o.finish_reason) for o in outs]
            results[i] = comps
            if not two_phase:
                continue
            with self._tok_lock:
                tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=False)
            for j, o in enumerate(outs):
                if o.finish_reason != "length":
                    continue
                inject, inject_ids = "", []
                if thinking.thought_open(tail + o.text, cfg):
                    inject = cfg.force_close_text + cfg.close_tag
                    with self._tok_lock:
                        inject_ids = self.tokenizer.encode(inject, add_special_tokens=False)
                    comps[j].text += inject
                    comps[j].completion_tokens += len(inject_ids)
                    comps[j].forced_close = True
                left = max_new - len(o.token_ids) - len(inject_ids)
                if left < 1:
                    continue
                seed = None if s.seed is None else s.seed + 1000 + j  # distinct continuation per sample
                cont.append(GenRequest(ids + list(o.token_ids) + inject_ids, left, s.temperature, s.top_p, seed, 1))
                where.append((i, j, inject, len(inject_ids)))
        return cont, where

    @staticmethod
    def _merge(results, where, outs2) -> None:
        """Append each phase-2 continuation to its sample."""
        for (i, j, _, _), outs in zip(where, outs2, strict=True):
            c = results[i][j]
            if isinstance(outs, BaseException):
                c.finish_reason, c.error = "error", _engine_error(outs)
                continue
            o = outs[0]
            c.text += o.text
            c.completion_tokens += len(o.token_ids)
            c.finish_reason = o.finish_reason

    # -------------------------------------------------------------------------------- scoring
    def nll(self, conversations: Sequence[list[dict]], targets: Sequence[str]) -> list[float]:
        """Mean per-token negative log-likelihood of each target as the assistant's reply to its
        conversation (nan for an empty target or one that does not fit the context)."""
        seqs, starts, keep = [], [], []
        for k, (conv, target) in enumerate(zip(conversations, targets, strict=True)):
            prompt = self.render(conv)
            with self._tok_lock:
                tgt = self.tokenizer.encode(target, add_special_tokens=False) if target else []
            if not tgt or len(prompt) + len(tgt) > self.max_model_len:
                continue
            seqs.append(prompt + tgt)
            starts.append(len(prompt))
            keep.append(k)
        out = [float("nan")] * len(targets)
        if seqs:
            for k, lps in zip(keep, self._prompt_logprobs(seqs, starts), strict=True):
                out[k] = -sum(lps) / len(lps)
        return out


class ScheduledEngine(Engine):
    """An engine whose own thread schedules the model (vLLM's step loop, the transformers engine's batch
    loop): callers `_submit` requests and wait on their futures, a coroutine without holding a thread, so
    requests from many callers share the model's batches."""

    def _submit(self, requests: Sequence[GenRequest], progress: Sequence[SampleProgress | None] | None = None
                ) -> list[Future]:
        """One future per request; `progress` (per request, or None): reported from the engine's thread."""
        raise NotImplementedError

    def _outputs(self, fut: Future) -> list[GenOutput] | BaseException:
        """A finished request's n outputs, or the exception that failed it (blocks until it finished)."""
        err = fut.exception()
        return err if err is not None else fut.result()

    def _give_up(self, futures: Sequence[Future]) -> None:
        """The caller left: stop computing these requests (those not started yet at least)."""
        for f in futures:
            f.cancel()

    def _generate(self, requests: Sequence[GenRequest]) -> list[list[GenOutput] | BaseException]:
        return [self._outputs(f) for f in self._submit(requests)]

    async def _agenerate(self, requests: Sequence[GenRequest], progress: Sequence[SampleProgress | None] | None = None
                         ) -> list[list[GenOutput] | BaseException]:
        futures = self._submit(requests, progress)
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        except asyncio.CancelledError:  # the caller gave up (client timeout, replica draining)
            self._give_up(futures)
            raise
        return [self._outputs(f) for f in futures]


# ---------------------------------------------------------------------------------------------- registry
ENGINES: dict[str, type[Engine]] = {}


def _engine_error(e: BaseException) -> str:
    return f"engine_error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def cut_at_eos(tokens: Sequence[int], eos_ids: Any) -> tuple[list[int], str]:
    """Generated token ids up to the first end-of-sequence id, and "stop" if one was met, else "length"."""
    out: list[int] = []
    for t in tokens:
        if t in eos_ids:
            return out, "stop"
        out.append(t)
    return out, "length"


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` up to the first occurrence of any stop string (excluded), or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(hits)] if hits else None


class StreamedText:
    """The text of one answer as it grows, turned into the pieces a stream sends: nothing past a stop string,
    and a tail that may be the start of one held back until the text goes on (or ends)."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.sent = ""

    def advance(self, text: str, final: bool = False) -> str:
        """The new piece to send now that the answer reads `text` (empty: nothing yet)."""
        if self.stop:
            cut = cut_at_stop(text, self.stop)
            if cut is not None:
                text = cut
            elif not final:
                held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                text = text[: len(text) - held]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""


OnProgress = Callable[[int, int, str], None]  # (request index, sample index, the sample's text so far)
SampleProgress = Callable[[int, str], None]  # one request's: (sample index, its text so far)


def _sample_progress(on_text: OnProgress, request: int, sample: int | None = None, prefix: str = "") -> SampleProgress:
    """One generation request's progress reported as its chat request's: a phase-2 continuation is one
    sample (`sample`) whose text follows `prefix`."""
    def report(j: int, text: str) -> None:
        on_text(request, j if sample is None else sample, prefix + text)
    return report


def register(name: str) -> Callable[[type[Engine]], type[Engine]]:
    def deco(cls: type[Engine]) -> type[Engine]:
        cls.name = name
        ENGINES[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # Imported lazily: vllm is heavy and absent on some machines; the transformers engine must not need it.
    import importlib

    for mod in ("ralm.llm.engines.transformers", "ralm.llm.engines.vllm"):
        try:
            importlib.import_module(mod)
        except ImportError as e:  # pragma: no cover - depends on the install
            log.debug("engine module %s unavailable: %s", mod, e)


def build_engine(llm_cfg: Any, model_path: str | None = None) -> Engine:
    """Build the engine named by `llm_cfg.engine` for `llm_cfg.model` (resolved offline)."""
    from ralm.llm.models import resolve_model

    if llm_cfg.engine not in ENGINES:
        _load_builtin()
    if llm_cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {llm_cfg.engine!r}; registered: {sorted(ENGINES)}")
    path = model_path or resolve_model(llm_cfg.model, allow_network=getattr(llm_cfg, "allow_network", False))
    return ENGINES[llm_cfg.engine](llm_cfg, path)


__all__ = ["ChatRequest", "Completion", "ENGINES", "Engine", "GenOutput", "GenRequest", "Sampling",
           "build_engine", "register"]
