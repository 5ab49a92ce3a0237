"""`ralm rephrase`: self-rephrasing into audio-perception language -> `run_dir/rephrase/data`.

Every generate row gets `rephrased` (the training target) beside the kept `response`:
- the same frozen LLM rewrites the response: think tags renamed (`<think>` -> `<text_llm_reasoning>`),
  rules + few-shot before/after pairs, the rewrite returned inside `<answer>...</answer>`, tags mapped back
  (`ralm.selfgen.prompting`);
- a rewrite is accepted only if it parses, has no leak (lexical detector), stays within the length bounds
  (`min_length_ratio`..`max_length_ratio` of the response's tokens, +- `length_slack_tokens`), keeps the
  verified answer (the verifier agrees again when the response agreed) and, with `judge`, the LLM judge
  says NO (a YES regenerates, at most `judge_max_regenerations` times);
- otherwise it is retried (new seed) up to `max_attempts`, then rejected with the last reason
  (`unparseable`, `leak`, `too_long`, `too_short`, `lost_answer`, `judge_leak`, engine errors), or, with
  `on_failure: keep_clean_original`, the original is kept when it is verified and leak-free
  (verdicts.rephrase = kept_original);
- skipped (rephrased = response): instruction rows (ALARM: their targets answer a spoken question and
  need no rewrite), metadata-fallback targets (already hearing language), and everything when
  `rephrase.enabled` is false.
"""

from __future__ import annotations

import logging
from typing import Any

from ralm import records, storage
from ralm.llm.engines import ChatRequest, Completion, Sampling
from ralm.selfgen import audit, prompting
from ralm.selfgen.leak import find_leaks, leak_summary
from ralm.selfgen.stage import carry, count_pending, pending, row_seed, run_batches
from ralm.selfgen.verify import AGREE, DISAGREE, verify

log = logging.getLogger(__name__)
STAGE = "rephrase"
FATAL = ("prompt_too_long", "bad_request")


class TokenCounter:
    """Token counts of targets with the LLM's own tokenizer (words x 1.3 when it cannot be loaded)."""

    def __init__(self, cfg: Any) -> None:
        self.tok = None
        try:
            from transformers import AutoTokenizer

            from ralm.llm.models import resolve_model

            self.tok = AutoTokenizer.from_pretrained(resolve_model(cfg.llm.model, cfg.llm.allow_network))
        except Exception as e:  # noqa: BLE001 - counts are only used for bounds and the report
            log.warning("no tokenizer for %s (%s): counting words x 1.3", cfg.llm.model, e)

    def __call__(self, text: str | None) -> int:
        if not text:
            return 0
        if self.tok is None:
            return int(round(len(text.split()) * 1.3))
        return len(self.tok.encode(text, add_special_tokens=False))


def skip_reason(row: dict, enabled: bool) -> str | None:
    if not enabled:
        return "disabled"
    if row.get("domain") == "instruction":
        return "instruction"
    if (row.get("verdicts") or {}).get("target_source") == "metadata_fallback":
        return "metadata_fallback"
    return None


class Rephraser:
    def __init__(self, cfg: Any, backend: Any, count: TokenCounter) -> None:
        self.cfg, self.backend, self.count = cfg, backend, count
        self.r = cfg.rephrase
        th = cfg.llm.thinking
        self.open_tag, self.close_tag = th.open_tag, th.close_tag

    def _request(self, row: dict, attempt: int) -> ChatRequest:
        s = self.r.sampling
        msgs = prompting.rephrase_messages(row["response"], self.open_tag, self.close_tag, self.r.renamed_think_tag)
        return ChatRequest(msgs, Sampling(s.temperature, s.top_p, s.max_new_tokens,
                                          row_seed(s.seed, row["id"], 100 + attempt)))

    def check(self, row: dict, text: str | None) -> tuple[str | None, str]:
        """(failure reason or None, detail) for a parsed rewrite."""
        if text is None:
            return "unparseable", "no <answer>...</answer> in the rephraser's output"
        leaks = find_leaks(text)
        if leaks:
            return "leak", leak_summary(text)
        n0 = max(1, row.get("response_tokens") or self.count(row["response"]))
        n1 = self.count(text)
        slack = self.r.length_slack_tokens
        if n1 > self.r.max_length_ratio * n0 + slack:
            return "too_long", f"{n1} tokens vs {n0}"
        if n1 < self.r.min_length_ratio * n0 - slack:
            return "too_short", f"{n1} tokens vs {n0}"
        before = (row.get("verdicts") or {}).get("verify")
        v = verify(row.get("task"), text, row, self.close_tag)
        if (before == AGREE and v.status != AGREE) or v.status == DISAGREE:
            return "lost_answer", v.reason
        return None, v.status

    def __call__(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        out: list[dict] = []
        rejects: list[dict] = []
        state: dict[str, dict[str, Any]] = {}
        for row in rows:
            why = skip_reason(row, self.r.enabled)
            if why is not None or not row.get("response"):
                out.append(self._row(row, row.get("response"), {"rephrase": f"skipped:{why or 'empty'}"}))
                continue
            state[row["id"]] = {"row": row, "fail": None, "detail": "", "judged": 0, "attempt": 0}
        budget = self.r.max_attempts + (self.r.judge_max_regenerations if self.r.judge else 0)
        for _ in range(budget):
            todo = [s for s in state.values() if "kept" not in s and "fatal" not in s
                    and s["attempt"] < self.r.max_attempts + s["judged"]]
            if not todo:
                break
            comps = self.backend.chat([self._request(s["row"], s["attempt"]) for s in todo])
            passed: list[tuple[dict, str, Completion]] = []
            for s, cs in zip(todo, comps, strict=True):
                s["attempt"] += 1
                comp = cs[0] if cs else Completion.failed("engine_error: empty result")
                if not comp.ok:
                    s["fail"], s["detail"] = comp.reason or "engine_error", comp.error or ""
                    if comp.reason in FATAL:
                        s["fatal"] = True
                    continue
                text = prompting.parse_rephrase(comp.text, self.open_tag, self.close_tag, self.r.renamed_think_tag)
                fail, detail = self.check(s["row"], text)
                if fail:
                    s["fail"], s["detail"] = fail, detail
                    continue
                passed.append((s, text, comp))
            judged = self._judge([t for _, t, _ in passed]) if self.r.judge else [False] * len(passed)
            for (s, text, _comp), leaky in zip(passed, judged, strict=True):
                if leaky and s["judged"] < self.r.judge_max_regenerations:
                    s["judged"] += 1
                    s["fail"], s["detail"] = "judge_leak", "the LLM judge said the rewrite reveals a text"
                    continue
                if leaky:
                    s["fail"], s["detail"] = "judge_leak", "the LLM judge said the rewrite reveals a text"
                    s["fatal"] = True
                    continue
                s["kept"] = (text, s["attempt"])
        for s in state.values():
            row = s["row"]
            if "kept" in s:
                text, attempts = s["kept"]
                out.append(self._row(row, text, {"rephrase": "rephrased", "rephrase_attempts": str(attempts),
                                                 "judge": "no" if self.r.judge else "off"}))
            elif (self.r.on_failure == "keep_clean_original" and not find_leaks(row["response"])
                  and (row.get("verdicts") or {}).get("verify") == AGREE and s["fail"] not in FATAL):
                out.append(self._row(row, row["response"], {"rephrase": "kept_original",
                                                            "rephrase_fail": s["fail"] or ""}))
            else:
                rejects.append(records.reject(row["id"], STAGE, s["fail"] or "engine_error", s["detail"],
                                              row.get("source"), row.get("audio_uri")))
        return out, rejects

    def _judge(self, texts: list[str]) -> list[bool]:
        if not texts:
            return []
        reqs = [ChatRequest(prompting.judge_messages(t), Sampling(0.0, 1.0, 4, 0)) for t in texts]
        # An unparseable judge answer counts as NO: the lexical detector already passed the text.
        return [bool(cs and cs[0].ok and prompting.parse_yes_no(cs[0].text)) for cs in self.backend.chat(reqs)]

    def _row(self, row: dict, text: str | None, verdicts: dict[str, str]) -> dict:
        v = {**(row.get("verdicts") or {}), **verdicts}
        v["rephrased_leaks"] = str(len(find_leaks(text)))
        return carry(row, rephrased=text, rephrased_tokens=self.count(text) if text else None, verdicts=v)


def run(cfg: Any, run_dir: str) -> str:
    """Write `run_dir/rephrase`; returns its URI. Resumable: committed ids are skipped."""
    storage.configure(cfg.storage)
    stage_uri = cfg.stage_uri(STAGE, run_dir)
    if records.is_complete(stage_uri):
        return stage_uri
    src = records.data_uri(cfg.stage_uri("generate", run_dir))
    if not records.part_uris(src):
        raise FileNotFoundError(f"no generate dataset at {src}: run `ralm generate` first")
    done = records.done_ids(stage_uri)
    todo = count_pending(src, done, None)
    counts = {"rows": 0, "rejects": 0, "batches": 0, "inputs": 0}
    count = TokenCounter(cfg)
    backend = None
    try:
        if cfg.rephrase.enabled and (todo or cfg.rephrase.audit_nll_samples):
            from ralm.selfgen.backend import open_backend

            backend = open_backend(cfg)
        if todo:
            counts = run_batches(stage_uri, pending(src, done), Rephraser(cfg, backend, count),
                                 cfg.rephrase.part_rows, todo, "rephrase",
                                 parts_in_flight=cfg.llm.serve.parts_in_flight)
        report = audit.rephrase_report(stage_uri, cfg, counts, backend, run_dir)
    finally:
        if backend is not None:
            backend.close()
    audit.write_report(stage_uri, report)
    records.mark_success(stage_uri, {"rows": len(records.read_ids(records.data_uri(stage_uri)))})
    return stage_uri
