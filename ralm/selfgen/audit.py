"""Stage reports of the text stages: `report.json` + `report.md` beside each dataset.

Computed from the committed datasets (streamed part by part), so a rerun after a crash reports the whole
stage, not just the last run. What each report holds:
- prompts: clips, rows, rejects by reason, prompt sources (llm | template), tasks.
- generate: rows, rejects by reason, target sources (self_generated | metadata_fallback), the verified-
  agreement rate of the first candidate (before best-of-N) and of the kept self-generated targets (after),
  leak rate of the responses, truncation (finish_reason length), tokens.
- rephrase: rows, rejects by reason, outcomes (rephrased | kept_original | skipped:*), leak rate of the
  generated vs the rephrased targets on the same records, length ratio and word-level edit ratio
  rephrased/original, verified agreement of the surviving targets, and the frozen LLM's mean per-token NLL
  of original vs rephrased targets given the generation prompt (a sample of `audit_nll_samples` rows).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from typing import Any

from ralm import records, storage
from ralm.selfgen.leak import has_leak
from ralm.selfgen.verify import AGREE, verify


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _stats(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": round(statistics.fmean(xs), 4), "median": round(statistics.median(xs), 4), "n": len(xs)}


def word_edit_distance(a: list[str], b: list[str], cap: int = 400) -> int:
    """Levenshtein distance on words (both sides capped at `cap` words to bound the cost)."""
    a, b = a[:cap], b[:cap]
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, wb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb))
        prev = cur
    return prev[-1]


def edit_ratio(original: str, rewritten: str) -> float:
    a, b = original.split(), rewritten.split()
    return word_edit_distance(a, b) / max(1, len(a))


def _rejects(stage_uri: str) -> dict[str, int]:
    return dict(Counter(r["reason"] for r in records.read_rejects(stage_uri)).most_common())


# ---------------------------------------------------------------------------------------------- reports
def prompts_report(stage_uri: str, cfg: Any, run_counts: dict[str, int]) -> dict[str, Any]:
    sources, tasks, clips, rows = Counter(), Counter(), set(), 0
    for r in records.iter_records(records.data_uri(stage_uri), ["id", "clip_id", "task", "verdicts"]):
        rows += 1
        clips.add(r["clip_id"])
        sources[r["verdicts"].get("prompt_source", "?")] += 1
        tasks[r["task"] or "?"] += 1
    return {"stage": "prompts", "source": cfg.prompts.source, "splits": list(cfg.prompts.splits),
            "clips": len(clips), "rows": rows, "rejects": _rejects(stage_uri),
            "prompt_sources": dict(sources), "tasks": dict(tasks.most_common()), "this_run": run_counts}


def generate_report(stage_uri: str, cfg: Any, run_counts: dict[str, int]) -> dict[str, Any]:
    rows, src, first, finish, leaks, attempts = 0, Counter(), Counter(), Counter(), 0, Counter()
    agree_after, tokens, self_gen, self_leaks = 0, [], 0, 0
    for r in records.iter_records(records.data_uri(stage_uri),
                                  ["id", "response", "response_tokens", "finish_reason", "verdicts"]):
        v = r["verdicts"]
        rows += 1
        src[v.get("target_source", "?")] += 1
        finish[r["finish_reason"] or "?"] += 1
        leak = has_leak(r["response"])
        leaks += leak
        attempts[v.get("attempts", "?")] += 1
        if v.get("verify") == AGREE:
            first[v.get("first_verify", "?")] += 1
        if v.get("target_source") == "self_generated":
            self_gen += 1
            self_leaks += leak
            tokens.append(r["response_tokens"])
            agree_after += v.get("verify") == AGREE
    rejects = _rejects(stage_uri)
    # Rows whose target had to agree with a fact: accepted-as-verified rows + the unverified rejects.
    checkable = sum(first.values()) + rejects.get("unverified", 0)
    return {
        "stage": "generate", "model": cfg.llm.model, "best_of_n": cfg.generation.best_of_n,
        "fallback": cfg.generation.fallback, "rows": rows, "rejects": rejects,
        "target_sources": dict(src),
        "checkable_rows": checkable,
        "agreement_before_best_of_n": _rate(first.get(AGREE, 0), checkable),
        "agreement_after_best_of_n": _rate(agree_after, checkable),
        "metadata_fallback_rate": _rate(src.get("metadata_fallback", 0), checkable),
        "first_candidate_verdicts": dict(first),
        "attempts": dict(sorted(attempts.items())),
        "leak_rate_self_generated": _rate(self_leaks, self_gen),
        "leak_rate_all_targets": _rate(leaks, rows),
        "finish_reasons": dict(finish),
        "truncated_rate": _rate(finish.get("length", 0), self_gen),
        "response_tokens": _stats(tokens),
        "this_run": run_counts,
    }


def rephrase_report(stage_uri: str, cfg: Any, run_counts: dict[str, int], backend: Any,
                    run_dir: str) -> dict[str, Any]:
    from ralm.selfgen.generate import messages_for

    rows, outcome, src = 0, Counter(), Counter()
    same_before = same_after = 0
    rw_rows = rw_before = rw_after = 0
    length_ratio, edits, verified = [], [], Counter()
    nll_rows: list[dict] = []
    close_tag = cfg.llm.thinking.close_tag
    for r in records.iter_records(records.data_uri(stage_uri)):
        v = r["verdicts"]
        rows += 1
        kind = v.get("rephrase", "?")
        outcome[kind] += 1
        src[v.get("target_source", "?")] += 1
        lb, la = has_leak(r["response"]), has_leak(r["rephrased"])
        same_before += lb
        same_after += la
        verified[verify(r["task"], r["rephrased"], r, close_tag).status] += 1
        if kind != "rephrased":
            continue
        rw_rows += 1
        rw_before += lb
        rw_after += la
        if r["response_tokens"] and r["rephrased_tokens"]:
            length_ratio.append(r["rephrased_tokens"] / r["response_tokens"])
        edits.append(edit_ratio(r["response"], r["rephrased"]))
        if len(nll_rows) < cfg.rephrase.audit_nll_samples:
            nll_rows.append(r)
    # Every generated response this stage took in (kept or rejected) vs the targets it let out.
    seen = records.done_ids(stage_uri)
    gen_uri = records.data_uri(cfg.stage_uri("generate", run_dir))
    gen_rows = gen_leaks = 0
    for r in records.iter_records(gen_uri, ["id", "response"]):
        if r["id"] in seen:
            gen_rows += 1
            gen_leaks += has_leak(r["response"])
    report: dict[str, Any] = {
        "stage": "rephrase", "enabled": cfg.rephrase.enabled, "judge": cfg.rephrase.judge,
        "on_failure": cfg.rephrase.on_failure, "rows": rows, "rejects": _rejects(stage_uri),
        "outcomes": dict(outcome), "target_sources": dict(src),
        # All inputs (generated responses, kept or rejected here) vs the targets that survive.
        "leak_rate_generated_inputs": _rate(gen_leaks, gen_rows),
        "leak_rate_targets": _rate(same_after, rows),
        # The same records (the survivors): their generated response vs their rephrased target.
        "leak_rate_generated_same_records": _rate(same_before, rows),
        "leak_rate_rephrased_same_records": _rate(same_after, rows),
        # Only the rows the LLM actually rewrote.
        "rewritten_rows": rw_rows,
        "leak_rate_generated_rewritten": _rate(rw_before, rw_rows),
        "leak_rate_rephrased_rewritten": _rate(rw_after, rw_rows),
        "length_ratio": _stats(length_ratio),
        "word_edit_ratio": _stats(edits),
        "target_verdicts": dict(verified),
        "target_agreement_rate": _rate(verified.get(AGREE, 0), rows),
        "this_run": run_counts,
    }
    report["nll"] = _nll(nll_rows, cfg, backend, messages_for)
    return report


def _nll(rows: list[dict], cfg: Any, backend: Any, messages_for: Any) -> dict[str, Any]:
    if backend is None or not rows:
        return {"n": 0, "note": "not computed (no LLM backend or no rewritten rows)"}
    convs = [messages_for(r, cfg.generation.system_prompt) for r in rows]
    try:
        before = backend.nll(convs, [r["response"] for r in rows])
        after = backend.nll(convs, [r["rephrased"] for r in rows])
    except Exception as e:  # noqa: BLE001 - a report must not fail the stage
        return {"n": 0, "note": f"failed: {type(e).__name__}: {e}"}
    pairs = [(b, a) for b, a in zip(before, after, strict=True) if not (math.isnan(b) or math.isnan(a))]
    if not pairs:
        return {"n": 0, "note": "no scorable pair"}
    return {"n": len(pairs), "original_mean": round(statistics.fmean(b for b, _ in pairs), 4),
            "rephrased_mean": round(statistics.fmean(a for _, a in pairs), 4),
            "delta_mean": round(statistics.fmean(a - b for b, a in pairs), 4)}


# ---------------------------------------------------------------------------------------------- writing
def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report.get('stage', 'stage')} report", "", "| metric | value |", "|---|---|"]
    for k, v in report.items():
        if k == "stage":
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv}" for kk, vv in v.items()) or "-"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        lines.append(f"| {k} | {'-' if v is None else v} |")
    return "\n".join(lines) + "\n"


def write_report(stage_uri: str, report: dict[str, Any]) -> None:
    storage.write_text(storage.join(stage_uri, "report.json"), json.dumps(report, indent=2, default=str) + "\n")
    storage.write_text(storage.join(stage_uri, "report.md"), to_markdown(report))
