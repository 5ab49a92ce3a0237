"""The eval stage: `run(cfg, run_dir) -> run_dir/eval`.

1. Load the benchmark (`cfg.eval.benchmark`; the demo's MCQ file is built from the corpus' test split
   when `cfg.eval.data` is unset). Unusable items become rejects.
2. Every item is asked three ways: with its audio, with another clip's audio (`shuffled`) and with silence
   (`silence`) — the controls — as one Ray Data inference job (encoders -> adapter(s) -> frozen LLM).
   Predictions are committed as Parquet parts under `eval/runs/<benchmark>-<fingerprint>/data/`; a rerun
   skips what is committed, and a changed setting (data, adapters, prompt...) gets a fresh folder.
3. Scoring follows the benchmark's official rule; unparsed replies count as wrong and are reported.
4. Writes `eval/report.json` + `eval/report.md` (overall, per domain/category/difficulty, each control,
   chance, unparsed rate, the text-preservation check; 95% CIs and paired tests of the real audio against
   each control and chance, `ralm.eval.significance`, since ~90 items make a few points' gap noise),
   `eval/<benchmark>.report.json`, and the official MMAU-shape predictions
   `eval/<benchmark>_predictions.json` (+ one per control).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from typing import Any

from ralm import records, storage
from ralm.config import RalmConfig
from ralm.eval.benchmarks import Benchmark, MCQItem, get_benchmark
from ralm.eval.controls import ControlError, apply_control, chance
from ralm.eval.inference import CHOICE_SCORING_MODES
from ralm.eval.scoring import build_prompt, parse_choice, score_item, summarize
from ralm.eval.significance import (
    binomial_p_above_chance,
    describe_vs_control,
    format_p,
    paired_comparison,
    verdict,
    wilson_interval,
)

log = logging.getLogger(__name__)

STAGE = "eval"
TEXT_CHECK_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.")


def default_adapters(cfg: RalmConfig, run_dir: str) -> list[str]:
    return list(cfg.eval.adapters) or [storage.join(run_dir, "train", "export")]


def resolve_data(cfg: RalmConfig, run_dir: str) -> str:
    """The benchmark file; for `demo` without `eval.data`, the MCQ file built from the corpus (once)."""
    ec = cfg.eval
    if ec.data:
        return ec.data
    if ec.benchmark != "demo":
        raise ValueError(f"eval.data is required for benchmark {ec.benchmark!r} (the benchmark's json/jsonl file)")
    from ralm.eval.mcq import DEFAULT_FACTS, build_demo_mcq_from_corpus

    out = storage.join(cfg.stage_uri(STAGE, run_dir), "demo_mcq.json")
    # Built once per settings: other facts, questions per clip or seed rebuild it (the predictions are keyed
    # by the file's content, so answers to the old questions are never reused for new ones).
    settings = {"facts": list(ec.mcq_facts or DEFAULT_FACTS), "per_clip": ec.mcq_per_clip, "seed": ec.seed}
    settings_uri = storage.join(cfg.stage_uri(STAGE, run_dir), "demo_mcq.settings.json")
    if not (storage.exists(out) and storage.exists(settings_uri) and storage.read_json(settings_uri) == settings):
        build_demo_mcq_from_corpus(cfg.stage_uri("corpus", run_dir), out, facts=settings["facts"],
                                   per_clip=ec.mcq_per_clip, seed=ec.seed)
        storage.write_json(settings_uri, settings)
    return out


def fingerprint(cfg: RalmConfig, data: str, adapters: list[str]) -> str:
    ec = cfg.eval
    key = {"benchmark": ec.benchmark, "data": data, "audio_root": ec.audio_root, "adapters": adapters,
           "data_sha1": hashlib.sha1(storage.read_bytes(data)).hexdigest(),  # an edited file is another benchmark
           "glue": ec.ensemble_glue if len(adapters) > 1 else None, "instruction": ec.instruction,
           "max_new_tokens": ec.max_new_tokens, "limit": ec.limit, "seed": ec.seed}
    if ec.answer_mode != "generate":  # keeps the fingerprint (and committed predictions) of older runs
        key["answer_mode"] = ec.answer_mode
    if ec.benchmark == "mcq":  # another mapping of the file's columns: other items
        key["fields"] = ec.fields.model_dump(mode="json")
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def conditions(items: list[MCQItem], controls: list[str], seed: int) -> tuple[dict[str, list[MCQItem]], dict[str, str]]:
    out, skipped = {"audio": items}, {}
    for name in controls:
        try:
            out[name] = apply_control(name, items, seed)
        except ControlError as e:
            skipped[name] = str(e)
    return out, skipped


def _check_adapters(adapters: list[str]) -> None:
    from ralm.model.export import CONFIG

    missing = [a for a in adapters if not storage.exists(storage.join(a, CONFIG))]
    if missing:
        raise FileNotFoundError(f"no exported adapter at {missing} (expected {CONFIG} there): run the train "
                                "stage first or set eval.adapters")


# ---------------------------------------------------------------------------------------------- inference
def infer(cfg: RalmConfig, rows: list[dict[str, Any]], adapters: list[str], pred_uri: str, bench: str,
          reply_prefix: str = "") -> None:
    """Ray Data job over the rows not yet committed under `pred_uri`; commits parts as batches finish."""
    from ralm.cluster import init_ray
    from ralm.eval.inference import backend_options, batch_infer

    done = records.done_ids(pred_uri)
    todo = [r for r in rows if r["id"] not in done]
    if not todo:
        return
    import ray

    init_ray(cfg.ray)
    ec = cfg.eval
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // ec.batch_size, 64)))
    out = batch_infer(ds, adapters, backend=ec.backend, max_new_tokens=ec.max_new_tokens,
                      batch_size=ec.batch_size, concurrency=ec.concurrency, num_cpus=ec.num_cpus,
                      num_gpus=ec.num_gpus, encoder_specs=cfg.features.encoders, glue=ec.ensemble_glue,
                      answer_mode=ec.answer_mode, reply_prefix=reply_prefix, storage_cfg=cfg.storage,
                      backend_options=backend_options(cfg))
    from tqdm import tqdm

    with records.PartWriter(records.data_uri(pred_uri), part_rows=max(ec.batch_size, 16)) as good, \
            records.PartWriter(records.rejects_uri(pred_uri), records.REJECT_SCHEMA, part_rows=64) as bad, \
            tqdm(total=len(todo), desc=f"eval {bench}", unit="item") as bar:
        for batch in out.iter_batches(batch_size=ec.batch_size, batch_format="numpy"):
            bar.update(len(batch["id"]))
            for i in range(len(batch["id"])):
                row = {k: batch[k][i] for k in batch}
                if row["finish_reason"] == "error":
                    reason, _, detail = str(row["error"]).partition(": ")
                    if reason == storage.UNREACHABLE:  # not the item's fault: stop, reject nothing; a rerun resumes
                        raise storage.StorageError(detail)
                    bad.add(records.reject(str(row["id"]), STAGE, reason or "error", detail,
                                           source=f"eval:{bench}", audio_uri=str(row["audio"])))
                    continue
                good.add(records.make_record(
                    id=str(row["id"]), clip_id=str(row["item_id"]), source=f"eval:{bench}", split="test",
                    domain=str(row["domain"]) or None, audio_uri=str(row["audio"]), prompt=str(row["question"]),
                    task=str(row["category"]) or None, response=str(row["output"]),
                    response_tokens=int(row["completion_tokens"]), finish_reason=str(row["finish_reason"]),
                    verdicts={"condition": str(row["condition"]),
                              **({"choice_logprobs": str(row["choice_logprobs"])} if "choice_logprobs" in row else {})},
                ))


# ---------------------------------------------------------------------------------------------- scoring
def template_opens_thought(export_dir: str) -> bool:
    """Whether the adapter's LLM chat template opens `<think>` in the generation prompt (tokenizer only)."""
    try:
        from transformers import AutoTokenizer

        from ralm.model.chat import ChatLayout
        from ralm.model.export import _llm_folder, read_export_config

        meta = read_export_config(export_dir)
        layout = ChatLayout(AutoTokenizer.from_pretrained(_llm_folder(meta, None)), meta.get("system_prompt"))
        return layout.suffix_text("q").rstrip().endswith("<think>")
    except Exception as e:  # pragma: no cover - a template we cannot render: parse as plain replies
        log.warning("could not inspect the chat template of %s: %s", export_dir, e)
        return False


def score_items(bench: Benchmark, conds: dict[str, list[MCQItem]], preds: dict[str, dict[str, Any]],
                errors: dict[str, dict[str, Any]], thought_open: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per condition, one scored row per item (in the condition's order): `id`, `correct`, `pred_index`,
    `choices`, the group values, `error` (the inference reject's reason, else None) and `submission`
    (the official-shape prediction row). Kept per item so conditions can be compared item by item."""
    scored = {}
    for cond, items in conds.items():
        rows = []
        for it in items:
            key = f"{cond}/{it.id}"
            output = (preds.get(key) or {}).get("response") or ""
            error = errors[key]["reason"] if key in errors else (None if key in preds else "missing_prediction")
            idx = parse_choice(output, it.choices, thought_open)
            rows.append({"id": it.id, "correct": score_item(bench.scorer, it.choices, it.answer_index, idx),
                         "pred_index": idx, "choices": it.choices,
                         **{g: it.group_value(g) for g in bench.group_keys},
                         "error": error, "submission": bench.submission_row(it, idx, output)})
        scored[cond] = rows
    return scored


def summarize_scored(bench: Benchmark, scored: dict[str, list[dict[str, Any]]]
                     ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Per condition: the summary (with the accuracy's 95% Wilson interval) and the submission rows."""
    summaries, submissions = {}, {}
    for cond, rows in scored.items():
        summary = summarize(rows, bench.group_keys)
        summary["accuracy_ci95"] = list(wilson_interval(summary["correct"], summary["total"]))
        summary["errors"] = dict(Counter(r["error"] for r in rows if r["error"]))
        summaries[cond] = summary
        submissions[cond] = [r["submission"] for r in rows]
    return summaries, submissions


def _by_item(rows: list[dict[str, Any]]) -> dict[tuple[str, int], bool]:
    """Correctness keyed by (item id, n-th use of that id): pairs conditions by item, not by position,
    and still pairs right if a benchmark file repeats an id."""
    seen: Counter[str] = Counter()
    out = {}
    for r in rows:
        out[(r["id"], seen[r["id"]])] = bool(r["correct"])
        seen[r["id"]] += 1
    return out


def vs_controls(scored: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per control: the real audio vs that control on the items both scored (paired delta, its 95% CI,
    the discordant counts and McNemar's exact p) — is the gap more than noise?"""
    audio = _by_item(scored["audio"])
    out = {}
    for cond, rows in scored.items():
        if cond == "audio":
            continue
        ctrl = _by_item(rows)
        keys = [k for k in audio if k in ctrl]
        cmp = paired_comparison([audio[k] for k in keys], [ctrl[k] for k in keys])
        out[cond] = {"n": cmp["n"], "delta": cmp["delta"], "ci95": list(cmp["ci95"]),
                     "audio_right_control_wrong": cmp["a_right_b_wrong"],
                     "audio_wrong_control_right": cmp["a_wrong_b_right"], "mcnemar_p": cmp["mcnemar_p"]}
    return out


def p_above_chance(items: list[MCQItem], correct: int) -> float | None:
    """Exact one-sided p-value that `correct` right answers on `items` beat uniform guessing."""
    return binomial_p_above_chance(correct, len(items), [1 / len(it.choices) for it in items])


def text_preservation(adapters: list[str], glue: str) -> dict[str, Any]:
    from ralm.eval.inference import ALMInference, check_text_preserved

    engine = ALMInference(adapters, load_encoders=False, glue=glue)
    try:
        rows = check_text_preserved(engine, TEXT_CHECK_PROMPTS, max_new_tokens=24)
    finally:
        engine.close()
    return {"passed": all(r["same"] for r in rows), "prompts": rows}


def start_text_check(cfg: RalmConfig, adapters: list[str]) -> Any:
    """The text-preservation check as a Ray task on an inference-sized worker (the driver may have no GPU),
    running beside the inference job."""
    import ray

    task = ray.remote(text_preservation).options(num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus)
    return task.remote(adapters, cfg.eval.ensemble_glue)


# ---------------------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float | None] | None) -> str:
    return "n/a" if not ci or ci[0] is None else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _heard_lines(report: dict[str, Any]) -> list[str]:
    """"Is the audio heard?": each control's paired gap with its uncertainty, and the test against chance."""
    vs, p_chance = report.get("vs_controls") or {}, report.get("p_above_chance")
    if not vs and p_chance is None:
        return []
    lines = ["", "## Is the audio heard?", "",
             "Same items under each condition: the gap in accuracy points with its 95% CI, and McNemar's exact "
             "test on the discordant items (right with the real audio only vs with the control only).", ""]
    lines += [f"- audio vs {name}: {describe_vs_control(c)}" for name, c in vs.items()]
    if p_chance is not None:
        lines.append(f"- audio vs chance: {_pct(report.get('overall'))} vs {_pct(report.get('chance'))} "
                     f"(exact one-sided {format_p(p_chance)}) — {verdict(p_chance)}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    conds = report["conditions"]
    lines = [f"# Evaluation: {report['benchmark']}", "",
             f"{report['items']} items ({report['rejected_items']} rejected at load) from `{report['data']}`; "
             f"adapters: {', '.join(f'`{a}`' for a in report['adapters'])}"
             + (" (ALARM-E ensemble)" if len(report["adapters"]) > 1 else "") + ".", "",
             "| condition | accuracy | 95% CI | correct / total | unparsed | errors |", "|---|---|---|---|---|---|"]
    for name, s in conds.items():
        lines.append(f"| {name} | {_pct(s['accuracy'])} | {_ci(s.get('accuracy_ci95'))} | {s['correct']} / {s['total']} | "
                     f"{_pct(s['unparsed_rate'])} | {sum(s['errors'].values())} |")
    lines.append(f"| chance | {_pct(report['chance'])} | | | | |")
    lines += _heard_lines(report)
    for group in report.get("group_keys", []):
        key = f"by_{group}"
        values = sorted({v for s in conds.values() for v in s.get(key, {})})
        if not values:
            continue
        lines += ["", f"## By {group}", "", "| " + group + " | " + " | ".join(conds) + " | chance |",
                  "|---" * (len(conds) + 2) + "|"]
        for v in values:
            cells = [_pct(conds[c].get(key, {}).get(v, {}).get("accuracy")) for c in conds]
            ch = conds["audio"].get(key, {}).get(v, {}).get("chance")
            n = conds["audio"].get(key, {}).get(v, {}).get("total", 0)
            lines.append(f"| {v} (n={n}) | " + " | ".join(cells) + f" | {_pct(ch)} |")
    if report.get("skipped_controls"):
        lines += ["", "Skipped controls: " + "; ".join(f"{k}: {v}" for k, v in report["skipped_controls"].items())]
    tp = report.get("text_preserved")
    if tp:
        lines += ["", f"Text preserved (text-only prompts through the ALM == the frozen LLM's greedy output): "
                  f"**{'yes' if tp.get('passed') else 'NO'}**" + (f" ({tp['error']})" if tp.get("error") else "")]
    if report.get("answer_mode") in CHOICE_SCORING_MODES:
        lines += ["", "Answers by likelihood: each choice was scored as the ALM's reply to the question (mean "
                  "token log-probability" + (", minus its score with no audio at all" if report["answer_mode"] == "pmi"
                                             else "") + ") and the best one chosen, so every reply maps to a choice: an unparsed item here is one "
                  "that failed (the errors column, e.g. audio that does not decode)."]
    lines += ["", "Unparsed replies count as wrong (never a random guess). Predictions in the official "
              f"format: `{report['predictions']}`.", ""]
    return "\n".join(lines)


def run(cfg: RalmConfig, run_dir: str | None = None) -> str:
    """The eval stage. Returns `run_dir/eval`."""
    t0 = time.time()
    run_dir = run_dir or cfg.storage.run_dir
    storage.configure(cfg.storage)
    ec = cfg.eval
    stage = cfg.stage_uri(STAGE, run_dir)
    bench = get_benchmark(ec.benchmark, ec.fields)
    data = resolve_data(cfg, run_dir)
    loaded = bench.load(data, ec.audio_root, ec.limit, audio_dir=storage.join(stage, "audio"))
    if not loaded.items:
        first = loaded.rejects[0] if loaded.rejects else None
        raise ValueError(f"{data}: no usable {bench.name} items ({len(loaded.rejects)} rejected: "
                         f"{Counter(r['reason'] for r in loaded.rejects).most_common(3)}"
                         + (f"; item {first['id']}: {first['detail']}" if first else "") + ")")
    adapters = default_adapters(cfg, run_dir)
    _check_adapters(adapters)
    pred_uri = storage.join(stage, "runs", f"{bench.name}-{fingerprint(cfg, data, adapters)}")
    conds, skipped = conditions(loaded.items, list(ec.controls), ec.seed)

    # Items the loader rejected are recorded once, like any stage's rejects.
    if loaded.rejects and not records.part_uris(records.rejects_uri(storage.join(pred_uri, "load"))):
        records.write_part(records.rejects_uri(storage.join(pred_uri, "load")),
                           [records.reject(r["id"], STAGE, r["reason"], r["detail"], source=f"eval:{bench.name}")
                            for r in loaded.rejects], records.REJECT_SCHEMA)

    by_likelihood = ec.answer_mode in CHOICE_SCORING_MODES
    rows = [{"id": f"{cond}/{it.id}", "item_id": it.id, "condition": cond, "audio": it.audio,
             "question": it.question if by_likelihood else build_prompt(it.question, it.choices, ec.instruction),
             "domain": it.domain or "", "category": it.category or "",
             **({"choices": json.dumps(list(it.choices))} if by_likelihood else {})}
            for cond, items in conds.items() for it in items]
    # An item's conditions side by side: they land in one inference batch, which shares their no-audio prior.
    order = {it.id: i for i, it in enumerate(loaded.items)}
    rows.sort(key=lambda r: order.get(r["item_id"], len(order)))
    thought_open = template_opens_thought(adapters[0])
    tp_uri = storage.join(pred_uri, "text_check.json")
    text_check = storage.read_json(tp_uri) if ec.text_check and storage.exists(tp_uri) else None
    tp_ref = None
    if ec.text_check and text_check is None:
        from ralm.cluster import init_ray

        init_ray(cfg.ray)
        tp_ref = start_text_check(cfg, adapters)
    # A template that opens a thought in its generation prompt gets it closed before the scored choice.
    infer(cfg, rows, adapters, pred_uri, bench.name, reply_prefix="</think>\n\n" if thought_open else "")
    if tp_ref is not None:
        import ray

        try:
            text_check = ray.get(tp_ref)
            storage.write_json(tp_uri, text_check)
        except Exception as e:  # the check must not cost the benchmark numbers
            log.exception("text-preservation check failed to run")
            text_check = {"passed": None, "error": f"{type(e).__name__}: {e}"}

    preds = {r["id"]: r for r in records.read_records(records.data_uri(pred_uri), ["id", "response"])}
    errors = {r["id"]: r for r in records.read_rejects(pred_uri)}
    scored = score_items(bench, conds, preds, errors, thought_open and not by_likelihood)
    summaries, submissions = summarize_scored(bench, scored)

    pred_file = storage.join(stage, f"{bench.name}_predictions.json")
    storage.write_json(pred_file, submissions["audio"])
    for cond in conds:
        if cond != "audio":
            storage.write_json(storage.join(stage, f"{bench.name}_predictions.{cond}.json"), submissions[cond])

    report: dict[str, Any] = {
        "benchmark": bench.name, "data": data, "audio_root": ec.audio_root, "adapters": adapters,
        "backend": ec.backend, "answer_mode": ec.answer_mode, "scorer": bench.scorer, "group_keys": list(bench.group_keys),
        "items": len(loaded.items), "rejected_items": len(loaded.rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in loaded.rejects)),
        "overall": summaries["audio"]["accuracy"], "unparsed_rate": summaries["audio"]["unparsed_rate"],
        "chance": chance(loaded.items),
        "controls": {c: summaries[c]["accuracy"] for c in conds if c != "audio"},
        "vs_controls": vs_controls(scored), "p_above_chance": p_above_chance(loaded.items, summaries["audio"]["correct"]),
        "by_domain": summaries["audio"].get("by_domain", {}),
        "conditions": summaries, "skipped_controls": skipped, "predictions": pred_file,
        "predictions_dir": pred_uri,
    }
    if text_check is not None:
        report["text_preserved"] = text_check
    report["wall_s"] = round(time.time() - t0, 1)

    storage.write_json(storage.join(stage, f"{bench.name}.report.json"), report)
    # eval/report.json: this benchmark's report, plus the headline numbers of every benchmark run here.
    index_uri = storage.join(stage, "report.json")
    previous = storage.read_json(index_uri).get("benchmarks", {}) if storage.exists(index_uri) else {}
    previous[bench.name] = {"overall": report["overall"], "controls": report["controls"], "chance": report["chance"],
                            "unparsed_rate": report["unparsed_rate"], "items": report["items"]}
    storage.write_json(index_uri, {**report, "benchmarks": previous})
    storage.write_text(storage.join(stage, "report.md"), render_markdown(report))
    records.mark_success(stage, {"benchmark": bench.name, "overall": report["overall"]})
    return stage
