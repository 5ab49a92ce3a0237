"""`ralm generate`: self-generation with best-of-N verification -> `run_dir/generate/data`.

For every prompt row: ALARM's messages (system prompt; user turn `<start_audio>{surrogate}<end_audio>\n\n
{prompt}`), max new tokens from config (a truncated response is kept, finish_reason `length`);
`instruction` clips: the LLM answers the spoken question's transcript (plus the prompt's text context
only when it is not the generic "answer the spoken question") — these targets skip rephrasing.

Grounding (beyond ALARM): candidates are sampled one round at a time (seed = f(row id, attempt)) until the
verifier agrees with the record's metadata, up to `best_of_n`; the first agreeing one is kept. A candidate
is accepted unverified only when the record holds nothing to check it against (an instruction without a
known answer, a clip without facts). No agreeing candidate -> `generation.fallback`: `metadata` writes a
grounded answer built from the metadata, labelled `verdicts.target_source = metadata_fallback` and counted
in the report; `reject` writes a reject row (`unverified`). Per-row failures (prompt over the context
limit, engine error, timeout) become reject rows; the job goes on.

verdicts: target_source (self_generated | metadata_fallback), verify (agree | unverifiable), verify_reason,
first_verify (the first candidate's verdict: the agreement rate *before* best-of-N), attempts,
leaks (leak spans in the kept response), prompt_tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from ralm import records, storage
from ralm.llm.engines import ChatRequest, Completion, Sampling
from ralm.selfgen import audit, prompting
from ralm.selfgen.fallback import grounded_answer
from ralm.selfgen.leak import find_leaks
from ralm.selfgen.stage import carry, count_pending, pending, row_seed, run_batches
from ralm.selfgen.verify import AGREE, UNVERIFIABLE, Verdict, facts_of, transcript_of, verify

log = logging.getLogger(__name__)
STAGE = "generate"
# Errors that no resampling can fix: reject at once.
FATAL = ("prompt_too_long", "bad_request")


def messages_for(row: dict, system_prompt: str) -> list[dict]:
    if row.get("domain") == "instruction":
        transcript = transcript_of(row)
        if not transcript:
            raise ValueError("instruction clip without a transcript of its spoken question")
        context = None if (row.get("task") or "instruction") == "instruction" else row.get("prompt")
        return prompting.instruction_messages(transcript, context)
    if not row.get("surrogate") or not row.get("prompt"):
        raise ValueError("row without surrogate or prompt")
    return prompting.generation_messages(system_prompt, row["surrogate"], row["prompt"])


def nothing_to_check(row: dict) -> bool:
    """True when a candidate cannot be verified for lack of facts (then it is accepted unverified)."""
    if row.get("domain") == "instruction":
        return "answer" not in (row.get("metadata") or {})
    return not facts_of(row)


class Generator:
    def __init__(self, cfg: Any, backend: Any) -> None:
        self.cfg, self.backend = cfg, backend
        self.g = cfg.generation
        self.close_tag = cfg.llm.thinking.close_tag

    def _request(self, row: dict, msgs: list[dict], attempt: int) -> ChatRequest:
        s = self.g.sampling
        return ChatRequest(msgs, Sampling(s.temperature, s.top_p, s.max_new_tokens,
                                          row_seed(s.seed, row["id"], attempt)))

    def _judge(self, row: dict, comp: Completion) -> tuple[bool, Verdict]:
        if comp.completion_tokens < self.g.min_tokens:
            return False, Verdict("too_short", f"{comp.completion_tokens} < {self.g.min_tokens} tokens")
        if comp.completion_tokens > self.g.max_tokens:
            return False, Verdict("too_long", f"{comp.completion_tokens} > {self.g.max_tokens} tokens")
        v = verify(row.get("task"), comp.text, row, self.close_tag)
        ok = v.status == AGREE or (v.status == UNVERIFIABLE and nothing_to_check(row))
        return ok, v

    def __call__(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        out: list[dict] = []
        rejects: list[dict] = []
        state: dict[str, dict[str, Any]] = {}
        for row in rows:
            try:
                msgs = messages_for(row, self.g.system_prompt)
            except ValueError as e:
                rejects.append(records.reject(row["id"], STAGE, "bad_input", str(e), row.get("source"),
                                              row.get("audio_uri")))
                continue
            state[row["id"]] = {"row": row, "msgs": msgs, "first": None, "last": None, "errors": []}
        for attempt in range(self.g.best_of_n):
            todo = [s for s in state.values() if "kept" not in s and "fatal" not in s]
            if not todo:
                break
            comps = self.backend.chat([self._request(s["row"], s["msgs"], attempt) for s in todo])
            for s, cs in zip(todo, comps, strict=True):
                comp = cs[0] if cs else Completion.failed("engine_error: empty result")
                if not comp.ok:
                    s["errors"].append(comp.error or comp.reason or "engine_error")
                    if comp.reason in FATAL:
                        s["fatal"] = comp
                    continue
                ok, v = self._judge(s["row"], comp)
                s["first"] = s["first"] or v
                s["last"] = v
                if ok:
                    s["kept"] = (comp, v, attempt + 1)
        for s in state.values():
            row = s["row"]
            if "kept" in s:
                comp, v, attempts = s["kept"]
                out.append(self._row(row, comp.text, comp.completion_tokens, comp.finish_reason, {
                    "target_source": "self_generated", "verify": v.status, "verify_reason": v.reason,
                    "first_verify": s["first"].status, "attempts": str(attempts),
                    "prompt_tokens": str(comp.prompt_tokens)}))
                continue
            if "fatal" in s:
                err = s["fatal"].error or "prompt_too_long"
                rejects.append(records.reject(row["id"], STAGE, s["fatal"].reason or "engine_error", err,
                                              row.get("source"), row.get("audio_uri")))
                continue
            if s["last"] is None:  # every attempt was an engine error / timeout
                reason = (s["errors"][-1] if s["errors"] else "engine_error").split(":", 1)[0]
                rejects.append(records.reject(row["id"], STAGE, reason, " | ".join(s["errors"])[-2000:],
                                              row.get("source"), row.get("audio_uri")))
                continue
            text = grounded_answer(row.get("task"), row) if self.g.fallback == "metadata" else None
            if text is None:
                rejects.append(records.reject(row["id"], STAGE, "unverified",
                                              f"{self.g.best_of_n} candidates: {s['last'].reason}",
                                              row.get("source"), row.get("audio_uri")))
                continue
            out.append(self._row(row, text, None, "fallback", {
                "target_source": "metadata_fallback", "verify": AGREE, "verify_reason": "built from metadata",
                "first_verify": s["first"].status, "attempts": str(self.g.best_of_n),
                "llm_last_reason": s["last"].reason}))
        return out, rejects

    def _row(self, row: dict, text: str, tokens: int | None, finish: str, verdicts: dict[str, str]) -> dict:
        verdicts = {**(row.get("verdicts") or {}), **verdicts}
        verdicts["leaks"] = str(len(find_leaks(text)))
        return carry(row, response=text, response_tokens=tokens, finish_reason=finish, verdicts=verdicts)


def run(cfg: Any, run_dir: str) -> str:
    """Write `run_dir/generate`; returns its URI. Resumable: committed ids are skipped."""
    storage.configure(cfg.storage)
    stage_uri = cfg.stage_uri(STAGE, run_dir)
    if records.is_complete(stage_uri):
        return stage_uri
    src = records.data_uri(cfg.stage_uri("prompts", run_dir))
    if not records.part_uris(src):
        raise FileNotFoundError(f"no prompts dataset at {src}: run `ralm prompts` first")
    done = records.done_ids(stage_uri)
    todo = count_pending(src, done, None)
    counts = {"rows": 0, "rejects": 0, "batches": 0, "inputs": 0}
    if todo:
        from ralm.selfgen.backend import open_backend

        with open_backend(cfg) as backend:
            counts = run_batches(stage_uri, pending(src, done), Generator(cfg, backend),
                                 cfg.generation.part_rows, todo, "generate",
                                 parts_in_flight=cfg.llm.serve.parts_in_flight)
    audit.write_report(stage_uri, audit.generate_report(stage_uri, cfg, counts))
    records.mark_success(stage_uri, {"rows": len(records.read_ids(records.data_uri(stage_uri)))})
    return stage_uri
