"""`ralm features`: corpus clips -> decode -> one actor pool per encoder -> WebDataset shards.

Decoding runs in CPU tasks beside GPU actors, and inside the first pool's actors when they are CPU actors
(`features.decode_in_actor`).

The driver plans the shards and writes the work list in shard order (`ralm.features.plan`); Ray Data
reads it, decodes, runs the encoder pools and keeps that order (`preserve_order`), so shards complete one
after another and the driver holds one open shard (on local disk), never the corpus. Features are keyed
by clip: one sample per clip id, however many prompts it has.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ralm import records, storage
from ralm.audio import AudioError, load_audio
from ralm.config import EncoderSpec, FeaturesConfig, RalmConfig, StorageConfig
from ralm.features.plan import ITEMSIZE, plan_shards, write_work_list
from ralm.features.shards import INDEX_SCHEMA, ShardFile, finished_shards, shard_name, write_index

# The encoders (torch, ~250 MB and seconds of CPU per process) are imported where they are used: the Ray
# tasks that decode clips import this module and need neither.
if TYPE_CHECKING:
    from ralm.encoders import EncoderInfo

log = logging.getLogger(__name__)

STAGE = "features"


# ---------------------------------------------------------------------------------------------- plan
def storage_math(infos: list[EncoderInfo], dtype: str, hours: float) -> dict[str, Any]:
    item = ITEMSIZE[dtype]
    per_enc = {i.name: i.bytes_per_second(item) * 3600 for i in infos}
    per_hour = sum(per_enc.values())
    return {"dtype": dtype, "bytes_per_audio_hour": per_hour, "bytes_per_audio_hour_by_encoder": per_enc,
            "audio_hours": hours, "projected_bytes": per_hour * hours}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def _remove_stale_temps(shards_dir: str) -> None:
    """Temp files of a killed run (local shard dirs only; S3 never sees a partial shard)."""
    if not storage.is_remote(shards_dir):
        for uri in storage.ls(shards_dir, ".tmp-shard-*"):
            storage.remove(uri)


# ---------------------------------------------------------------------------------------------- Ray UDFs
def decode_batch(batch: dict[str, np.ndarray], sample_rates: list[int],
                 storage_cfg: StorageConfig | None = None) -> dict[str, np.ndarray]:
    """Decode + resample each clip once per needed rate; a failure becomes an `error` (reason) on the row."""
    if storage_cfg is not None:  # the worker reads audio from the run's store (endpoint, region)
        storage.configure(storage_cfg)
    n = len(batch["clip_id"])
    wavs: dict[int, list[np.ndarray]] = {sr: [] for sr in sample_rates}
    errors, details, seconds = [], [], []
    for i in range(n):
        uri = str(batch["audio_uri"][i])
        off = float(batch["offset_s"][i]) if batch["offset_s"][i] is not None else 0.0
        dur = batch["duration_s"][i]
        dur = None if dur is None or not np.isfinite(dur) or dur <= 0 else float(dur)
        err, detail, secs, out = "", "", 0.0, {}
        try:
            for sr in sample_rates:
                w = load_audio(uri, sr, off or 0.0, dur)
                if len(w) == 0:
                    raise AudioError("empty", f"{uri} decoded to no samples")
                if not np.all(np.isfinite(w)):
                    raise AudioError("corrupt", f"{uri} has NaN or infinite samples")
                out[sr] = w
            secs = len(out[sample_rates[0]]) / sample_rates[0]
        except AudioError as e:
            err, detail = e.reason, e.detail
        except storage.StorageError as e:  # the store, not the clip: the driver stops the stage, nothing is rejected
            err, detail = storage.UNREACHABLE, str(e)
        except Exception as e:  # anything else a decoder throws: still one reject, the job goes on
            err, detail = "decode_error", f"{uri}: {type(e).__name__}: {e}"
        for sr in sample_rates:
            wavs[sr].append(out.get(sr, np.zeros(1, dtype=np.float32)))
        errors.append(err)
        details.append(detail)
        seconds.append(secs)
    for sr, lst in wavs.items():
        batch[f"wav_{sr}"] = _objects(lst)
    batch["error"] = np.array(errors, dtype=object)
    batch["detail"] = np.array(details, dtype=object)
    batch["seconds"] = np.array(seconds, dtype=np.float64)
    return batch


def _objects(items: list[Any]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


@dataclass(frozen=True)
class EncoderPool:
    """One Ray Data actor pool: the encoders its actors load (one, or several sharing a `pool` name) and
    the pool's shape, taken from its members (largest sizes and resources, smallest batch)."""

    name: str
    specs: tuple[EncoderSpec, ...]

    @property
    def size(self) -> tuple[int, int]:
        lo = max(s.pool_min for s in self.specs)
        return lo, max(lo, *(s.pool_max for s in self.specs))

    @property
    def batch_size(self) -> int:
        return min(s.batch_size for s in self.specs)

    @property
    def num_cpus(self) -> float:
        return max(s.num_cpus for s in self.specs)

    @property
    def num_gpus(self) -> float:
        return max(s.num_gpus for s in self.specs)

    @property
    def concurrent_batches(self) -> int:
        return max(s.concurrent_batches for s in self.specs)

    @property
    def threads(self) -> int:
        # torch threads per concurrent batch: the actor's CPUs shared among its batches unless set
        return max(int(s.options.get("threads", max(1, int(s.num_cpus / s.concurrent_batches)))) for s in self.specs)


def encoder_pools(specs: list[EncoderSpec]) -> list[EncoderPool]:
    """The encoders grouped into actor pools by `pool` name (default: each its own), in config order."""
    groups: dict[str, list[EncoderSpec]] = {}
    for s in specs:
        groups.setdefault(s.pool or s.name, []).append(s)
    return [EncoderPool(name, tuple(members)) for name, members in groups.items()]


def decode_in_actor(features: FeaturesConfig, pools: list[EncoderPool]) -> bool:
    """Whether the first pool's actors decode (see `FeaturesConfig.decode_in_actor`); auto: CPU actors do."""
    if features.decode_in_actor is not None:
        return bool(features.decode_in_actor)
    return pools[0].num_gpus == 0


def _actor_pool_strategy(pool: EncoderPool) -> Any:
    import ray

    lo, hi = pool.size
    # Several batches at once on one actor's threads: torch releases the GIL inside its kernels.
    threaded = ({"max_concurrent_calls_per_actor": pool.concurrent_batches, "enable_true_multi_threading": True}
                if pool.concurrent_batches > 1 else {})
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, **threaded)


class EncoderActor:
    """One actor of an encoder pool: loads its frozen encoder(s) once, encodes the batches it is given
    with each in turn."""

    def __init__(self, specs: list[dict[str, Any]], dtype: str, threads: int, drop: list[str] | None = None,
                 decode_rates: list[int] | None = None, storage_cfg: StorageConfig | None = None):
        import torch

        from ralm.encoders import build_encoder

        torch.set_num_threads(threads)
        self.encoders = [build_encoder(EncoderSpec.model_validate(s)) for s in specs]
        self.dtype = np.dtype(dtype)
        self.drop = list(drop or [])  # the last pool drops the waveforms: no extra Ray Data operator for it
        self.decode_rates = list(decode_rates or [])  # set: this actor decodes its work-list rows first
        if storage_cfg is not None:
            storage.configure(storage_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode_rates:
            batch = decode_batch(batch, self.decode_rates)
        for encoder in self.encoders:
            self._encode(encoder, batch)
        for column in self.drop:
            batch.pop(column, None)
        return batch

    def _encode(self, encoder: Any, batch: dict[str, np.ndarray]) -> None:
        column = f"wav_{encoder.sample_rate}"
        errors = list(batch["error"])
        details = list(batch["detail"])
        feats: list[np.ndarray] = [np.zeros((1, 1, 1), dtype=self.dtype)] * len(errors)
        ok = [i for i, e in enumerate(errors) if not e]
        try:
            outs = encoder.encode([batch[column][i] for i in ok])
            for i, o in zip(ok, outs, strict=True):
                feats[i] = o.astype(self.dtype)
        except Exception:  # find the clip that fails; the others still get encoded
            for i in ok:
                try:
                    feats[i] = encoder.encode([batch[column][i]])[0].astype(self.dtype)
                except Exception as e:
                    errors[i] = "encode_error"
                    details[i] = f"{encoder.name}: {type(e).__name__}: {e}"
        batch[f"feat__{encoder.name}"] = _objects(feats)
        batch["error"] = np.array(errors, dtype=object)
        batch["detail"] = np.array(details, dtype=object)


def _arrow_filesystem(uri: str) -> Any:
    if not storage.is_remote(uri):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(storage.filesystem(uri)[0]))


def build_dataset(cfg: RalmConfig, work_parts: list[str]) -> Any:
    """The lazy Ray Data pipeline over the work list (in shard order): read -> decode (tasks, or the first
    pool's actors) -> encoder pools."""
    import ray

    from ralm.encoders import describe_encoder

    fs = _arrow_filesystem(work_parts[0])
    paths = [storage.filesystem(u)[1] for u in work_parts] if fs is not None else work_parts
    ds = ray.data.read_parquet(paths, filesystem=fs, file_extensions=["parquet"])
    rates = sorted({describe_encoder(s).sample_rate for s in cfg.features.encoders})
    # Decode tasks are capped: every new worker process costs seconds of start-up CPU on 2 cores.
    # Their batches are no larger than the smallest encoder batch: Ray bundles rows per task by this size,
    # and when it fuses decode into the first actor pool (same CPU shape) one big bundle = one busy actor.
    decode_bs = min([cfg.features.decode_batch_size] + [s.batch_size for s in cfg.features.encoders])
    # Work-list parts hold thousands of rows: cut them into batch-sized blocks (streaming, order kept) so
    # the encoder pools get many bundles to spread over their actors, not one bundle per part.
    ds = ds.repartition(target_num_rows_per_block=decode_bs)
    pools = encoder_pools(cfg.features.encoders)
    in_actor = decode_in_actor(cfg.features, pools)
    if not in_actor:
        ds = ds.map_batches(decode_batch, fn_kwargs={"sample_rates": rates, "storage_cfg": cfg.storage},
                            batch_format="numpy", batch_size=decode_bs, num_cpus=cfg.features.decode_num_cpus,
                            compute=ray.data.TaskPoolStrategy(size=cfg.features.decode_concurrency))
    for k, pool in enumerate(pools):
        ds = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={"specs": [s.model_dump(mode="json") for s in pool.specs],
                                   "dtype": cfg.shards.dtype, "threads": pool.threads,
                                   "drop": [f"wav_{sr}" for sr in rates] if k == len(pools) - 1 else [],
                                   "decode_rates": rates if in_actor and k == 0 else None,
                                   "storage_cfg": cfg.storage},
            compute=_actor_pool_strategy(pool),
            batch_size=pool.batch_size, batch_format="numpy", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
        )
    return ds


# ---------------------------------------------------------------------------------------------- stage
def run(cfg: RalmConfig, run_dir: str) -> str:
    """Encode every corpus clip with every configured encoder into shards; returns `run_dir/features`."""
    import ray
    from tqdm import tqdm

    from ralm.cluster import init_ray
    from ralm.encoders import describe_encoder

    t0 = time.time()
    storage.configure(cfg.storage)
    stage = cfg.stage_uri(STAGE, run_dir)
    corpus_data = records.data_uri(cfg.stage_uri("corpus", run_dir))
    if not records.part_uris(corpus_data):
        raise FileNotFoundError(f"no corpus dataset at {corpus_data}: run `ralm corpus build` first")
    shards_dir = (cfg.shards.uri or storage.join(stage, "shards")).rstrip("/")
    index_dir, rejects_dir = records.data_uri(stage), records.rejects_uri(stage)
    names = [s.name for s in cfg.features.encoders]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"features.encoders needs distinct names, got {names}")
    infos = [describe_encoder(s) for s in cfg.features.encoders]
    enc_meta = {i.name: i for i in infos}
    n_shards, stats = plan_shards(cfg, corpus_data, infos)
    hours = sum(stats["seconds"].values()) / 3600
    math_ = storage_math(infos, cfg.shards.dtype, hours)
    print(_storage_lines(infos, math_, stats))

    done = finished_shards(index_dir)
    meta = json.loads(json.dumps({"encoders": [i.to_dict() for i in infos], "dtype": cfg.shards.dtype,
                                  "shards_uri": shards_dir, "n_shards": n_shards}))
    meta_uri = storage.join(stage, "encoders.json")
    if done and storage.exists(meta_uri) and storage.read_json(meta_uri) != meta:
        # Finished shards were planned for other encoders / dtype / sizes / corpus: never mix them.
        raise ValueError(f"{stage} holds shards made with another features config or corpus "
                         f"(see {meta_uri}); use another run dir or delete {stage} to re-encode")
    records.clear_success(stage)
    storage.write_json(meta_uri, meta)
    _remove_stale_temps(shards_dir)
    rejected = {r["id"] for r in records.read_rejects(stage)}
    work, pending = write_work_list(corpus_data, storage.join(stage, "work"), n_shards, done, rejected)
    print(f"[features] {sum(stats['clips'].values())} clips, {len(done)} shards already finished, "
          f"{pending} clips to encode into {sum(n_shards.values())} planned shards under {shards_dir}")

    counts: Counter[str] = Counter()
    if pending:
        init_ray(cfg.ray)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete one after another, in order
        ds = build_dataset(cfg, work)
        pools = ", ".join(f"{'+'.join(s.name for s in p.specs)} x{p.size[0]}-{p.size[1]}"
                          for p in encoder_pools(cfg.features.encoders))
        # The bar stays at 0 while the actors import torch and load their encoders (seconds to minutes).
        print(f"[features] starting the encoder actor pools ({pools}); clips flow once their models are loaded")
        counts = _write_shards(ds, shards_dir, index_dir, rejects_dir, enc_meta, cfg.shards.dtype, stage,
                               tqdm(total=pending, desc="features", unit="clip"))
    report = _report(stage, infos, math_, stats, counts, len(done), time.time() - t0, cfg)
    records.mark_success(stage, {"shards": report["shards"], "clips": report["clips_in_shards"]})
    return stage


def _write_shards(ds: Any, shards_dir: str, index_dir: str, rejects_dir: str, enc_meta: dict[str, EncoderInfo],
                  dtype: str, stage: str, bar: Any) -> Counter[str]:
    counts: Counter[str] = Counter()
    current: tuple[str, int] | None = None
    shard: ShardFile | None = None
    rejects = records.PartWriter(rejects_dir, schema=records.REJECT_SCHEMA, part_rows=10**9)
    feat_cols = [f"feat__{n}" for n in sorted(enc_meta)]

    def finish() -> None:
        nonlocal shard
        rejects.flush()  # a shard's rejects are committed before the shard counts as finished
        if shard is not None and shard.rows:
            rows = shard.commit()
            assert current is not None
            write_index(index_dir, current[0], current[1], rows)
            counts["shards_written"] += 1
        elif shard is not None:
            shard.abort()
        shard = None

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for i in range(len(batch["clip_id"])):
                clip, split, n = str(batch["clip_id"][i]), str(batch["split"][i]), int(batch["shard"][i])
                bar.update(1)
                if (split, n) != current:
                    finish()
                    current = (split, n)
                    shard = ShardFile(storage.join(shards_dir, shard_name(split, n)), dtype)
                if batch["error"][i] == storage.UNREACHABLE:  # finished shards stay; a rerun resumes
                    raise storage.StorageError(str(batch["detail"][i]))
                if batch["error"][i]:
                    src = batch["source"][i]
                    rejects.add(records.reject(clip, STAGE, str(batch["error"][i]), str(batch["detail"][i]),
                                               None if src is None else str(src), str(batch["audio_uri"][i])))
                    counts["rejected"] += 1
                    continue
                feats = {c[len("feat__"):]: batch[c][i] for c in feat_cols}
                assert shard is not None
                shard.add(clip, round(float(batch["seconds"][i]), 6), split, feats, enc_meta)
                counts["encoded"] += 1
                counts["encoded_seconds"] += float(batch["seconds"][i])
        finish()
    except BaseException:
        if shard is not None:
            shard.abort()  # never publish a half-written shard
        rejects.flush()
        raise
    finally:
        bar.close()
    return counts


def _storage_lines(infos: list[EncoderInfo], m: dict[str, Any], stats: dict[str, Any]) -> str:
    lines = ["[features] storage math (before encoding):"]
    for i in infos:
        lines.append(f"  {i.name:<10} {i.model:<28} {len(i.layers)} layers x {i.width} x {m['dtype']} @ "
                     f"{i.frame_rate:g} Hz = {_fmt_bytes(m['bytes_per_audio_hour_by_encoder'][i.name])} per audio-hour")
    lines.append(f"  total {_fmt_bytes(m['bytes_per_audio_hour'])} per audio-hour; corpus "
                 f"{m['audio_hours']:.3f} h -> projected {_fmt_bytes(m['projected_bytes'])} "
                 f"(+ tar/json overhead: {_fmt_bytes(sum(stats['projected_bytes'].values()))} planned); "
                 f"19K h would take {_fmt_bytes(m['bytes_per_audio_hour'] * 19000)}")
    return "\n".join(lines)


def _report(stage: str, infos: list[EncoderInfo], m: dict[str, Any], stats: dict[str, Any], counts: Counter[str],
            skipped_shards: int, wall_s: float, cfg: RalmConfig) -> dict[str, Any]:
    index = records.read_table(records.data_uri(stage), schema=INDEX_SCHEMA)
    rejects = records.read_rejects(stage)
    shard_bytes = index.group_by("shard").aggregate([("bytes", "sum")]) if index.num_rows else None
    by_split = Counter(index.column("split").to_pylist()) if index.num_rows else Counter()
    total_bytes = int(sum(index.column("bytes").to_pylist())) if index.num_rows else 0
    enc_seconds = float(sum(index.column("duration_s").to_pylist())) if index.num_rows else 0.0
    report = {
        "stage": STAGE,
        "corpus_clips": sum(stats["clips"].values()),
        "corpus_seconds": sum(stats["seconds"].values()),
        "clips_in_shards": index.num_rows,
        "clips_by_split": dict(by_split),
        "encoded_this_run": counts.get("encoded", 0),
        "encoded_seconds_this_run": round(counts.get("encoded_seconds", 0.0), 3),
        "shards": shard_bytes.num_rows if shard_bytes is not None else 0,
        "shards_written_this_run": counts.get("shards_written", 0),
        "shards_skipped_finished": skipped_shards,
        "rejected": len(rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "bytes": total_bytes,
        "bytes_per_audio_hour_measured": total_bytes / (enc_seconds / 3600) if enc_seconds else None,
        "storage": m,
        "encoders": [i.to_dict() for i in infos],
        "shards_uri": (cfg.shards.uri or storage.join(stage, "shards")),
        "target_mb": cfg.shards.target_mb,
        "wall_s": round(wall_s, 2),
        "audio_seconds_per_s": round(counts.get("encoded_seconds", 0.0) / wall_s, 3) if wall_s else None,
    }
    storage.write_json(storage.join(stage, "report.json"), report)
    md = ["# features report\n", f"- clips in shards: {report['clips_in_shards']} of {report['corpus_clips']} "
          f"({report['corpus_seconds'] / 3600:.3f} h); by split: {json.dumps(report['clips_by_split'])}",
          f"- shards: {report['shards']} ({report['shards_written_this_run']} written now, "
          f"{skipped_shards} already finished), {_fmt_bytes(total_bytes)} at {report['shards_uri']}",
          f"- rejected: {report['rejected']} {json.dumps(report['rejects_by_reason'])}",
          f"- storage: {_fmt_bytes(m['bytes_per_audio_hour'])} per audio-hour ({m['dtype']}); measured "
          f"{_fmt_bytes(report['bytes_per_audio_hour_measured'] or 0)} per audio-hour incl. tar overhead",
          f"- wall time {report['wall_s']} s\n", "| encoder | model | layers | width | frame rate | per audio-hour |",
          "|---|---|---|---|---|---|"]
    md += [f"| {i.name} | {i.model} | {i.layers} | {i.width} | {i.frame_rate:g} | "
           f"{_fmt_bytes(m['bytes_per_audio_hour_by_encoder'][i.name])} |" for i in infos]
    storage.write_text(storage.join(stage, "report.md"), "\n".join(md) + "\n")
    return report
