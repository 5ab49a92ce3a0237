"""The transformers engine: a fallback for models vLLM can't load, and an exact reference in tests.

Requests run one at a time (n samples at once via num_return_sequences); fine for tiny/CPU models.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from ralm.llm.engines import Engine, GenOutput, GenRequest, cut_at_eos, register

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register("transformers")
class TransformersEngine(Engine):
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
        self._lock = threading.Lock()  # the global RNG and the model are shared by threads (Serve)

    @torch.inference_mode()
    def _generate(self, requests: Sequence[GenRequest]) -> list[list[GenOutput]]:
        with self._lock:
            return [self._one(r) for r in requests]

    def _one(self, r: GenRequest) -> list[GenOutput]:
        ids = torch.tensor([r.prompt_ids], device=self.device)
        sample = r.temperature > 0
        if r.seed is not None:
            torch.manual_seed(r.seed)
        kwargs: dict[str, Any] = dict(do_sample=sample, temperature=r.temperature, top_p=r.top_p) if sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        # Greedy samples are identical: decode once and repeat (generate refuses n > 1 without sampling).
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
            num_return_sequences=r.n if sample else 1,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, **kwargs,
        )
        rows = out[:, ids.shape[1]:].tolist()
        results = []
        for row in rows if sample else rows * r.n:
            toks, finish = cut_at_eos(row, self.eos_ids)
            results.append(GenOutput(toks, self.tokenizer.decode(toks, skip_special_tokens=True), finish))
        return results

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
        self.model = None
