"""The corpus stage: recipes -> validated clip records (Parquet parts) + rejects + report.

    ralm corpus build --config configs/demo.yaml [--run-dir DIR] [key=value ...]

Scanning is cheap and runs on the driver; decoding/validating audio runs as Ray Data tasks in bounded
chunks (the driver never holds more than one chunk). Ids are stable (hash of source + path + segment),
so a rerun skips every clip already committed or rejected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import islice
from typing import Any

from tqdm.auto import tqdm

from ralm import records, storage
from ralm.audio.io import AudioError, decode, probe, validate
from ralm.config import CorpusConfig, RalmConfig, StorageConfig
from ralm.corpus.prompts import template_prompts
from ralm.corpus.recipes import BadRow, RawClip, get_recipe
from ralm.corpus.surrogate import Segment, format_surrogate

log = logging.getLogger(__name__)
STAGE = "corpus"
CHUNK = 2048  # clips handed to Ray Data at a time


def assign_split(clip_id: str, cfg: CorpusConfig) -> str:
    """Hash-based split: the same clip always lands in the same split, whatever else is in the corpus."""
    u = int(hashlib.sha1(f"{clip_id}|{cfg.seed}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.valid_fraction:
        return "valid"
    return "train"


def check_clip(clip: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Decode + validate one clip; returns {"record": ...} or {"reject": ...}. Runs in Ray tasks."""
    try:
        info = probe(clip["audio_uri"], max_file_mb=cfg["max_file_mb"])
        if clip["duration_s"] is None and info.duration_s > cfg["max_seconds"] * 1.5:
            # Refuse before decoding a huge file into memory.
            raise AudioError("too_long", f"{clip['audio_uri']} lasts {info.duration_s:.1f}s > {cfg['max_seconds']}s")
        wav, sr = decode(clip["audio_uri"], clip["offset_s"], clip["duration_s"])
        duration = validate(wav, sr, min_seconds=cfg["min_seconds"], max_seconds=cfg["max_seconds"],
                            silence_dbfs=cfg["silence_dbfs"], uri=clip["audio_uri"])
    except AudioError as e:
        return {"reject": records.reject(clip["id"], STAGE, e.reason, e.detail, clip["source"], clip["audio_uri"])}
    except storage.StorageError as e:  # the store, not the clip: the driver stops the stage, nothing is rejected
        return {"unreachable": str(e)}
    except Exception as e:  # an unexpected decoder failure is still just this clip's problem
        return {"reject": records.reject(clip["id"], STAGE, "corrupt", f"{type(e).__name__}: {e}",
                                         clip["source"], clip["audio_uri"])}
    try:
        segments = [Segment(**s) for s in clip["segments"]] if clip["segments"] else None
        surrogate = format_surrogate(duration, transcript=None if segments else clip["transcript"],
                                     caption=clip["caption"], segments=segments, metadata=clip["metadata"])
        record = records.make_record(
            id=clip["id"], clip_id=clip["id"], source=clip["source"], split=clip["split"],
            domain=clip["domain"], audio_uri=clip["audio_uri"], offset_s=clip["offset_s"],
            duration_s=round(duration, 4), sample_rate=sr, surrogate=surrogate, metadata=clip["metadata"],
        )
        record["prompts"] = [p for _, p in template_prompts(record, k=3, seed=cfg["seed"])]
    except Exception as e:  # a row whose fields don't fit together is this row's problem only
        return {"reject": records.reject(clip["id"], STAGE, "invalid_record", f"{type(e).__name__}: {e}",
                                         clip["source"], clip["audio_uri"])}
    return {"record": record}


def _check_batch(batch: dict[str, Any], cfg: dict[str, Any], storage_cfg: StorageConfig) -> dict[str, Any]:
    storage.configure(storage_cfg)  # the worker reads audio from the run's store (endpoint, region)
    out = [json.dumps(check_clip(json.loads(c), cfg)) for c in batch["clip"]]
    return {"result": out}


def scan(cfg: RalmConfig, run_dir: str, found: Counter[str] | None = None) -> Iterator[RawClip | BadRow]:
    """Every recipe's clips and bad rows, in order; `found` counts the items each recipe gave (by
    `name at root`), so a recipe that finds nothing can be named."""
    for spec in cfg.corpus.recipes:
        recipe = get_recipe(spec.name)
        root = spec.root
        if root is None:  # only the demo may leave it out (checked by the config): it makes its own files
            root = cfg.corpus.assets_dir or os.path.join(run_dir, "assets", "demo")
        where = f"{spec.name} at {root}"
        if found is not None:
            found.setdefault(where, 0)  # listed even when it finds nothing
        count = 0
        for item in recipe.scan(root, spec.options):
            if isinstance(item, RawClip):
                if spec.limit is not None and count >= spec.limit:
                    break
                if spec.split:
                    item.split = spec.split
                count += 1
            if found is not None:
                found[where] += 1
            yield item
        if found is not None and not found[where]:
            log.warning("corpus: recipe %s found no clips (options %s)", where, spec.options)


def _no_clips_message(found: Counter[str], stage_uri: str) -> str:
    """Why a corpus came out empty, for the error that stops the run here rather than in the next stage."""
    empty = [where for where, n in found.items() if not n]
    lines = [f"the corpus has no clips: every recipe's files were rejected or none were found ({stage_uri})"]
    lines += [f"  recipe {where} found nothing (check its root, manifest glob or extensions)" for where in empty]
    by_reason: dict[str, dict[str, Any]] = {}
    for r in records.read_rejects(stage_uri):
        by_reason.setdefault(r["reason"], {"n": 0, "example": r["detail"]})["n"] += 1
    lines += [f"  {v['n']} rejected as {reason}, e.g. {v['example']}" for reason, v in
              sorted(by_reason.items(), key=lambda kv: -kv[1]["n"])]
    return "\n".join(lines)


def _clip_dict(item: RawClip, cfg: CorpusConfig) -> dict[str, Any]:
    cid = records.clip_id(item.source, item.rel_path, item.offset_s, item.duration_s)
    return {
        "id": cid, "source": item.source, "audio_uri": item.audio_uri, "domain": item.domain,
        "transcript": item.transcript, "caption": item.caption,
        "segments": [s.__dict__ for s in item.segments] if item.segments else None,
        "metadata": item.metadata, "split": item.split or assign_split(cid, cfg),
        "offset_s": item.offset_s, "duration_s": item.duration_s,
    }


def run(cfg: RalmConfig, run_dir: str | None = None, progress: bool = True) -> str:
    """Build the corpus dataset under `run_dir/corpus`; returns that URI."""
    import ray

    from ralm.cluster import init_ray

    run_dir = run_dir or cfg.storage.run_dir
    storage.configure(cfg.storage)
    stage_uri = cfg.stage_uri(STAGE, run_dir)
    if records.is_complete(stage_uri):
        log.info("corpus already complete at %s", stage_uri)
        return stage_uri
    start = time.time()
    done = records.done_ids(stage_uri)
    data_w = records.PartWriter(records.data_uri(stage_uri), part_rows=cfg.corpus.part_rows)
    rej_w = records.PartWriter(records.rejects_uri(stage_uri), records.REJECT_SCHEMA, part_rows=cfg.corpus.part_rows)
    check_cfg = cfg.corpus.model_dump(include={"max_file_mb", "max_seconds", "min_seconds", "silence_dbfs", "seed"})
    seen: set[str] = set()
    found: Counter[str] = Counter()
    pending = (item for item in scan(cfg, run_dir, found))
    init_ray(cfg.ray)
    bar = tqdm(desc="corpus: checking audio", unit="clip", disable=not progress)
    with data_w, rej_w:
        while True:
            chunk = list(islice(pending, CHUNK))
            if not chunk:
                break
            todo = []
            for item in chunk:
                if isinstance(item, BadRow):
                    bad_id = "bad-" + hashlib.sha1(f"{item.source}|{item.where}".encode()).hexdigest()[:16]
                    if bad_id not in done and bad_id not in seen:
                        rej_w.add(records.reject(bad_id, STAGE, item.reason, item.detail, item.source, item.audio_uri))
                        seen.add(bad_id)
                    continue
                clip = _clip_dict(item, cfg.corpus)
                if clip["id"] in done or clip["id"] in seen:
                    bar.update(1)
                    continue  # committed by an earlier run, or listed twice in the manifests
                seen.add(clip["id"])
                todo.append({"clip": json.dumps(clip)})
            if not todo:
                continue
            ds = ray.data.from_items(todo).map_batches(
                _check_batch, fn_kwargs={"cfg": check_cfg, "storage_cfg": cfg.storage},
                batch_size=cfg.corpus.batch_size, num_cpus=0.5,
            )
            for batch in ds.iter_batches(batch_size=cfg.corpus.batch_size):
                for res in batch["result"]:
                    res = json.loads(res)
                    if "unreachable" in res:  # what is committed stays; a rerun resumes from there
                        raise storage.StorageError(res["unreachable"])
                    if "record" in res:
                        data_w.add(res["record"])
                    else:
                        rej_w.add(res["reject"])
                    bar.update(1)
    bar.close()
    report = write_report(stage_uri, time.time() - start)
    if not report["records"]:  # not a finished stage: the next one would only fail less clearly
        raise ValueError(_no_clips_message(found, stage_uri))
    records.mark_success(stage_uri, {"records": report["records"], "rejects": report["rejects"]})
    return stage_uri


def summarize(stage_uri: str) -> dict[str, Any]:
    table = records.read_table(records.data_uri(stage_uri), ["domain", "split", "duration_s", "source"])
    clips: dict[str, Counter] = defaultdict(Counter)
    hours: dict[str, Counter] = defaultdict(Counter)
    for d, s, dur in zip(table["domain"].to_pylist(), table["split"].to_pylist(), table["duration_s"].to_pylist(),
                         strict=True):
        clips[d][s] += 1
        hours[d][s] += dur / 3600
    rejects = Counter(r["reason"] for r in records.read_rejects(stage_uri))
    return {
        "records": table.num_rows,
        "hours": round(sum(table["duration_s"].to_pylist()) / 3600, 4),
        "clips": {d: dict(c) for d, c in sorted(clips.items())},
        "hours_by_domain": {d: {s: round(h, 4) for s, h in c.items()} for d, c in sorted(hours.items())},
        "sources": dict(Counter(table["source"].to_pylist())),
        "rejects": sum(rejects.values()),
        "rejects_by_reason": dict(rejects.most_common()),
    }


def write_report(stage_uri: str, seconds: float) -> dict[str, Any]:
    report = summarize(stage_uri) | {"wall_s": round(seconds, 1)}
    storage.write_json(storage.join(stage_uri, "report.json"), report)
    storage.write_text(storage.join(stage_uri, "report.md"), render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    splits = sorted({s for c in report["clips"].values() for s in c})
    lines = ["# Corpus", "", f"{report['records']} clips, {report['hours'] * 60:.1f} minutes of audio, "
             f"{report['rejects']} rejected.", "", "| domain | " + " | ".join(splits) + " | total | minutes |",
             "|---|" + "---|" * (len(splits) + 2)]
    for d, c in report["clips"].items():
        mins = sum(report["hours_by_domain"][d].values()) * 60
        lines.append(f"| {d} | " + " | ".join(str(c.get(s, 0)) for s in splits) + f" | {sum(c.values())} | {mins:.1f} |")
    if report["rejects_by_reason"]:
        lines += ["", "| reject reason | clips |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in report["rejects_by_reason"].items()]
    return "\n".join(lines) + "\n"
