"""The transformers engine: a fallback for models vLLM can't load, and an exact reference in tests.

Concurrent requests are decoded together: callers queue their requests and one thread owns the model,
taking everything queued at once (after `llm.serve.batch_wait_timeout_s` when idle, so a burst arrives
whole) and decoding it in left-padded batches of `llm.serve.max_batch_size` rows. A Serve replica's
requests arrive one per call; waiting for them holds no thread. Sampling draws each row from its own
seed (`SeededSampling`), so an answer does not depend on the requests it was batched with; a lone prompt
is decoded unpadded, as `generate` would alone. Streamed requests report their text after each step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ralm.llm.engines import GenOutput, GenRequest, SampleProgress, ScheduledEngine, cut_at_eos, register
from ralm.llm.sampling import GREEDY, SeededSampling, sample_seeds

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Row:
    """One sequence to decode: sample `j` of a queued request."""

    request: int
    prompt_ids: list[int]
    max_tokens: int
    seed: int | None
    report: Callable[[str], None] | None = None  # the text so far -> the request's progress, streamed


class _Progress:
    """`generate(streamer=...)` for a batch: after each step, each streamed row's text so far (up to its
    EOS and max_tokens) goes to its `report`. An error in a report is logged; the batch goes on."""

    def __init__(self, rows: Sequence[_Row], tokenizer: Any, eos_ids: set[int]) -> None:
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, eos_ids
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.texts = [""] * len(rows)
        self.done = [row.report is None for row in rows]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        for k, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if self.done[k]:
                continue
            row, toks = self.rows[k], self.tokens[k]
            if token in self.eos_ids:
                self.done[k] = True
                continue
            toks.append(token)
            self.done[k] = len(toks) >= row.max_tokens
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if text != self.texts[k]:
                self.texts[k] = text
                try:
                    row.report(text)  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - a reader's error must not stop the batch for everyone
                    log.exception("a streamed request's progress callback failed")

    def end(self) -> None:
        pass


def _to_every_sample(progress: SampleProgress, n: int, text: str) -> None:
    for j in range(n):  # a greedy request's n samples are one decode
        progress(j, text)


@register("transformers")
class TransformersEngine(ScheduledEngine):
    def __init__(self, llm_cfg: Any, model_path: str) -> None:
        super().__init__(llm_cfg, model_path)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = _DTYPES.get(llm_cfg.dtype, torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or llm_cfg.max_model_len
        self.max_model_len = min(llm_cfg.max_model_len, limit)
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        serve = getattr(llm_cfg, "serve", None)
        self.max_batch_rows = int(getattr(serve, "max_batch_size", 8))
        self.gather_s = float(getattr(serve, "batch_wait_timeout_s", 0.0))
        self._lock = threading.Lock()  # the model decodes one batch (or scores one pass) at a time
        self._queue: queue.SimpleQueue[tuple[GenRequest, Future, SampleProgress | None] | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # nothing is queued behind close()'s stop: it would wait forever
        self._thread = threading.Thread(target=self._decode_loop, name="ralm-transformers-batches", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------- generation
    def _submit(self, requests: Sequence[GenRequest], progress: Sequence[SampleProgress | None] | None = None
                ) -> list[Future]:
        futures = []
        with self._closing:
            if self._closed:
                raise RuntimeError("the transformers engine is closed")
            for r, report in zip(requests, progress or [None] * len(requests), strict=True):
                futures.append(Future())
                self._queue.put((r, futures[-1], report))
        return futures

    def _decode_loop(self) -> None:  # the one thread that runs the model's generate
        while True:
            first = self._queue.get()  # idle: sleep until there is work
            if first is None:
                return
            if self.gather_s > 0:
                time.sleep(self.gather_s)
            queued, stop = [first], False
            while True:  # everything that arrived meanwhile joins this round
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    queued.append(item)
            live = [item for item in queued if item[1].set_running_or_notify_cancel()]
            if live:
                with self._lock:
                    self._decode_queued(live)
            if stop:
                return

    @torch.inference_mode()
    def _decode_queued(self, queued: list[tuple[GenRequest, Future, SampleProgress | None]]) -> None:
        try:
            groups: dict[tuple[float, float], list[_Row]] = defaultdict(list)  # (0, 0): greedy
            for i, (r, _, progress) in enumerate(queued):
                if r.temperature > 0:
                    for j, seed in enumerate(sample_seeds(r.seed, r.n)):
                        report = None if progress is None else partial(progress, j)
                        groups[(r.temperature, r.top_p)].append(_Row(i, r.prompt_ids, r.max_tokens, seed, report))
                else:  # greedy samples are identical: decode once, repeat below
                    report = None if progress is None else partial(_to_every_sample, progress, r.n)
                    groups[(0.0, 0.0)].append(_Row(i, r.prompt_ids, r.max_tokens, None, report))
            outs: dict[int, list[GenOutput]] = defaultdict(list)
            failed: dict[int, BaseException] = {}
            for (temperature, top_p), rows in groups.items():
                rows.sort(key=lambda row: len(row.prompt_ids))  # similar lengths together: less padding
                for chunk in self._batches(rows):
                    try:
                        decoded = self._decode_rows(chunk, temperature, top_p)
                    except Exception as e:  # noqa: BLE001 - these rows' requests fail; the others go on
                        failed.update({row.request: e for row in chunk})
                        continue
                    for row, toks in zip(chunk, decoded, strict=True):
                        toks, finish = cut_at_eos(toks[:row.max_tokens], self.eos_ids)
                        outs[row.request].append(
                            GenOutput(toks, self.tokenizer.decode(toks, skip_special_tokens=True), finish))
            for i, (r, fut, _) in enumerate(queued):
                if i in failed:
                    fut.set_exception(failed[i])
                else:  # a request's rows stay in order: the sort is stable and they share a prompt
                    fut.set_result(outs[i] if r.temperature > 0 else outs[i] * r.n)
        except BaseException as e:  # noqa: BLE001 - nobody may wait forever on a request we took
            log.exception("the transformers engine failed a batch")
            for _, fut, _ in queued:
                if not fut.done():
                    fut.set_exception(e)

    def _batches(self, rows: Sequence[_Row]) -> list[list[_Row]]:
        """Rows sorted by prompt length -> batches of at most max_batch_rows in which every row fits the
        context for the batch's longest max_tokens (a batch decodes that many steps for all its rows)."""
        batches: list[list[_Row]] = []
        for row in rows:
            last = batches[-1] if batches else None
            if (last is None or len(last) >= self.max_batch_rows
                    or len(row.prompt_ids) + max(row.max_tokens, *(r.max_tokens for r in last)) > self.max_model_len):
                batches.append([row])
            else:
                last.append(row)
        return batches

    def _decode_rows(self, rows: Sequence[_Row], temperature: float, top_p: float) -> list[list[int]]:
        """New token ids per row (up to the longest max_tokens of the batch), left-padded together."""
        width = max(len(row.prompt_ids) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[k, width - len(row.prompt_ids):] = 1
        sampling = SeededSampling([row.seed for row in rows], temperature, top_p).kwargs() if temperature > 0 else {}
        streamer = _Progress(rows, self.tokenizer, self.eos_ids) if any(row.report for row in rows) else None
        out = self.model.generate(
            ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max(r.max_tokens for r in rows),
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, streamer=streamer, **GREEDY, **sampling,
        )
        return out[:, width:].tolist()

    # -------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _prompt_logprobs(self, sequences: Sequence[list[int]], start: Sequence[int]) -> list[list[float]]:
        out = []
        with self._lock:
            for seq, s in zip(sequences, start, strict=True):
                ids = torch.tensor([seq], device=self.device)
                logits = self.model(ids).logits[0, s - 1 : -1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, s:, None])[:, 0]
                out.append(lp.tolist())
        return out

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # after what is queued: those are answered first
        self._thread.join(timeout=600)
        self.model = None
