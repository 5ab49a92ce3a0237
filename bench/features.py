"""Feature-extraction throughput: Ray Data actor pools vs a plain single-process loop, same clips, same run.

Prints one JSON line: audio-seconds per second through `ralm.features.pipeline.build_dataset` (decode
tasks + the encoder actor pool(s): by default one actor running every encoder on `cores` batches at once,
`--layout per-encoder` for a pool per encoder) and through a loop (load_audio + encoder.encode, torch on one thread,
the single-core baseline), and `ratio` = pool / loop. Both start from nothing loaded: the pool's workers
start, import torch and load the encoders; the loop runs in a fresh interpreter, timed from spawn to exit.
The cluster is up before the pool's clock starts, as it is for a job on a cluster: Ray itself and Ray
Data's per-cluster helper actors (`warm_ray_data`); `ratio_incl_warmup` adds the helpers' start-up back.
The loop runs first and its per-encoder CPU time sizes the pools (`size_pools`; `--no-sizing`: as configured).
`--ceiling` adds one plain loop process per core over a split of the same clips, no Ray: the ratio the
cores themselves allow (`ceiling_ratio`) and the share of it the pool keeps (`pool_of_ceiling`).
Usage: python bench/features.py [--clips 400] [--seconds 3] [--layout shared|per-encoder] [--pool N] [--ceiling]
       (~8-12 min on 2 cores; --ceiling adds about half the loop's time)
       python bench/features.py --memory --clips 100 --seconds 1   (driver peak RSS of the stage, N vs 4N clips)
       python bench/features.py --memory --corpus runs/demo --config demo   (the demo corpus vs 4 copies of it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import soundfile as sf


def corpus_rows(run_dir: str) -> list[dict]:
    from ralm import records

    return list(records.iter_records(records.data_uri(f"{run_dir}/corpus")))


def write_corpus(run_dir: str, rows, part_rows: int = 256) -> str:
    """Write `rows` (any iterable of records) as `run_dir`'s corpus; returns `run_dir`."""
    from ralm import records

    with records.PartWriter(records.data_uri(f"{run_dir}/corpus"), part_rows=part_rows) as w:
        w.extend(rows)
    return run_dir


def make_corpus(root: str, clips: int, seconds: float) -> str:
    from ralm import records

    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        sr = 16000 if i % 2 else 22050
        t = np.arange(int(sr * seconds)) / sr
        wav = 0.3 * np.sin(2 * np.pi * (110 * (1 + i % 8)) * t) + 0.05 * rng.standard_normal(len(t))
        path = os.path.join(root, f"clip{i:04d}.wav")
        sf.write(path, wav.astype(np.float32), sr)
        rows.append(records.make_record(id=f"c{i:04d}", clip_id=f"c{i:04d}", source="bench", split="train",
                                        audio_uri=path, offset_s=0.0, duration_s=seconds, sample_rate=sr))
    return write_corpus(os.path.join(root, "run"), rows, part_rows=16)


def _rates(progress: list[tuple[float, float]], wall: float) -> dict[str, float]:
    """Throughputs from (seconds since start, cumulative audio-seconds) points: end to end (start-up
    included), and steady state = the rate between 25% and 75% of the audio (start-up, pipeline fill and
    drain excluded), measured the same way for the pool and the loop."""
    total = progress[-1][1] if progress else 0.0

    def at(q: float) -> tuple[float, float]:
        return next((t, s) for t, s in progress if s >= q * total)

    (t25, s25), (t75, s75) = at(0.25), at(0.75)
    return {"audio_s": total, "wall_s": wall, "audio_s_per_s": total / wall, "first_output_s": progress[0][0],
            "steady_audio_s_per_s": (s75 - s25) / max(t75 - t25, 1e-9)}


def machine_cpu() -> tuple[float, float] | None:
    """(CPU-seconds stolen by the hypervisor, all CPU-seconds) since boot, summed over cores (Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return (ticks[7] if len(ticks) > 7 else 0) / hz, sum(ticks[:8]) / hz


def steal_share(before: tuple[float, float] | None) -> float | None:
    """Share of the machine's CPU time the hypervisor took since `before` (a virtual machine whose
    neighbours are busy runs every path slower; the paths run one after another, so it skews the ratio)."""
    after = machine_cpu()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 4)


def bench_loop(cfg, run_dir: str, t_spawn: float) -> dict:
    """The loop's progress points and its CPU-seconds per encoder (its profile)."""
    import torch

    from ralm import records
    from ralm.audio import load_audio
    from ralm.encoders import build_encoder

    torch.set_num_threads(1)
    encoders = [build_encoder(s) for s in cfg.features.encoders]
    seconds, progress, cpu = 0.0, [], {"decode": 0.0, **{e.name: 0.0 for e in encoders}}
    for r in records.iter_records(records.data_uri(f"{run_dir}/corpus")):
        decoded: dict[int, np.ndarray] = {}  # decode once per rate, as the pipeline does
        for enc in encoders:
            t = time.process_time()
            if enc.sample_rate not in decoded:
                decoded[enc.sample_rate] = load_audio(r["audio_uri"], enc.sample_rate, r["offset_s"] or 0.0,
                                                      r["duration_s"])
                cpu["decode"] += time.process_time() - t
                t = time.process_time()
            wav = decoded[enc.sample_rate]
            enc.encode([wav])
            cpu[enc.name] += time.process_time() - t
        seconds += len(wav) / encoders[-1].sample_rate
        progress.append((time.time() - t_spawn, seconds))
    return {"progress": progress, "encoder_cpu_s": cpu}


def size_pools(cfg, encoder_cpu_s: dict[str, float], cores: int, actors: int, shared: bool,
               concurrent: int = 1) -> dict[str, dict]:
    """Share the cores among decoding and the encoder pools by their cost (as the loop measured it), as
    one provisions a cluster after profiling: decode tasks get `cores x decode share` slots (at least one:
    every slot is a worker process to start; with decoding in the actors they hold the read tasks), the
    actors reserve the remaining CPUs. Per-encoder pools
    split them in proportion to each encoder's share of the work and run `ceil(cores x share / actors)`
    torch threads: with one actor per encoder on 2 cores the costlier encoder gets 2 threads, so the core
    the cheaper one leaves idle while it waits is not wasted (measured: 2 cores, 200 x 3 s, Whisper tiny
    0.33 CPU-s per clip, CREPE tiny 0.39: steady 6.9 audio-s/s with 1 thread each, 7.6 with CREPE on 2).
    A shared pool's actors each run every encoder, `concurrent` batches at once: an equal share and
    `ceil(cores / (actors x concurrent))` threads per batch."""
    from ralm.features.pipeline import decode_in_actor, encoder_pools

    decode_share = encoder_cpu_s.get("decode", 0.0) / (sum(encoder_cpu_s.values()) or 1.0)
    slots = max(1, round(cores * decode_share))
    cfg.features.decode_concurrency = slots
    encoder_cpu_s = {k: v for k, v in encoder_cpu_s.items() if k != "decode"}
    total = sum(encoder_cpu_s.values()) or 1.0
    # Decoding in the first pool's actors (CPU actors' default) still leaves a decode slot's CPUs free:
    # the work-list read tasks run there.
    spare = max(0.5, cores - slots * cfg.features.decode_num_cpus)
    in_actor = decode_in_actor(cfg.features, encoder_pools(cfg.features.encoders))
    sizes: dict[str, dict] = {"decode": {"share": round(decode_share, 3),
                                         **({"in_actor": True} if in_actor else {"tasks": slots})}}
    for spec in cfg.features.encoders:
        share = 1.0 if shared else encoder_cpu_s.get(spec.name, total / len(cfg.features.encoders)) / total
        spec.num_cpus = round(max(0.25, spare * share / actors), 2)
        spec.options["threads"] = max(1, math.ceil(round(cores * share / (actors * concurrent), 3)))
        sizes[spec.pool or spec.name] = {"share": round(share, 3), "actors": actors, "concurrent_batches": concurrent,
                                         "num_cpus": spec.num_cpus, "threads": spec.options["threads"]}
    return sizes


def bench_loop_processes(config: str | None, run_dirs: list[str]) -> dict[str, float]:
    """Plain loops as a script runs them: one fresh interpreter per run dir, all spawned at once, each
    importing torch, loading the encoders and encoding its clips, timed from spawn to the last exit (the
    pool's time includes its workers starting, importing and loading too). One run dir: the baseline; one
    per core over a split of the clips: what the cores give with no framework at all (`--ceiling`)."""
    import subprocess
    import sys

    cpu0, t_spawn = machine_cpu(), time.time()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--loop-only", d, "--spawned-at",
                               repr(t_spawn)] + (["--config", config] if config else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in run_dirs]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"loop process failed (exit {proc.returncode}):\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.time() - t_spawn
    # One progress line over all processes: each clip's audio at the time it was done.
    done = sorted((t, s - prev) for r in results for (t, s), prev in
                  zip(r["progress"], [0.0] + [s for _, s in r["progress"][:-1]], strict=True))
    progress, total = [], 0.0
    for t, s in done:
        total += s
        progress.append((t, total))
    cpu: dict[str, float] = {}
    for r in results:
        for k, v in r["encoder_cpu_s"].items():
            cpu[k] = cpu.get(k, 0.0) + v
    return {**_rates(progress, wall), "encoder_cpu_s": cpu, "steal": steal_share(cpu0)}


def split_corpus(src_run: str, root: str, parts: int) -> list[str]:
    """`parts` run dirs whose corpora deal out `src_run`'s clips in turn (same ids, same audio files)."""
    rows = corpus_rows(src_run)
    return [write_corpus(os.path.join(root, f"split{k}"), rows[k::parts]) for k in range(parts)]


def warm_ray_data() -> float:
    """Start Ray Data's per-cluster helper actors (stats, autoscaling coordinator, actor-location tracker:
    detached, created by the first Ray Data job on a cluster and kept for later ones) with a one-row job
    through a one-actor pool, before the pool's clock starts; returns its seconds. Measured on 2 cores:
    they cost the first job ~6 CPU-s and its first encoded clip ~10 s. Like `ray.init`, that is the
    cluster's start-up, not the pool's: a cluster that has run any Ray Data job has them (`ralm run`
    builds its corpus with Ray Data before the features stage). The report also gives the ratio with
    this time added (`ratio_incl_warmup`)."""
    import ray

    class Noop:  # defined here: pickled by value, so workers need not import this script
        def __call__(self, batch):
            return batch

    t = time.perf_counter()
    ray.data.range(1).map_batches(Noop, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.01).materialize()
    return time.perf_counter() - t


def bench_pool(cfg, run_dir: str) -> dict[str, float]:
    from ralm import records
    from ralm.encoders import describe_encoder
    from ralm.features.pipeline import build_dataset
    from ralm.features.plan import plan_shards, write_work_list

    corpus = records.data_uri(f"{run_dir}/corpus")
    cpu0, t0 = machine_cpu(), time.perf_counter()  # the driver's plan (two passes over the corpus) counts: the stage pays it
    n_shards, _ = plan_shards(cfg, corpus, [describe_encoder(s) for s in cfg.features.encoders])
    work, _ = write_work_list(corpus, f"{run_dir}/features/work", n_shards, set(), set())
    seconds, progress = 0.0, []
    for batch in build_dataset(cfg, work).iter_batches(batch_size=None, batch_format="numpy"):
        seconds += float(np.sum(batch["seconds"]))
        progress.append((time.perf_counter() - t0, seconds))
    return {**_rates(progress, time.perf_counter() - t0), "steal": steal_share(cpu0)}


def replicate_corpus(src_run: str, root: str, copies: int) -> tuple[str, int]:
    """A run dir whose corpus is `copies` copies of `src_run`'s corpus (new ids, same audio files), and
    its clip count."""
    rows = corpus_rows(src_run)
    run_dir = write_corpus(os.path.join(root, "run"), ({**r, "id": f"{r['id']}x{k}", "clip_id": f"{r['clip_id'] or r['id']}x{k}"}
                                                       for k in range(copies) for r in rows))
    return run_dir, copies * len(rows)


_CREPE_ONLY = ("{'features': {'encoders': [{'name': 'crepe', 'model': 'crepe-tiny', 'layers': [5],"
               " 'options': {'hop_length': 640}}]}, 'shards': {'target_mb': 1}}")


def _stage_peak_rss(run_dir: str, clips: int, config: str | None) -> dict:
    """Run the whole stage in a fresh process on a prepared run dir; its driver's peak RSS in MB."""
    import subprocess
    import sys

    cfg = f"load_config({config!r})" if config else f"RalmConfig.model_validate({_CREPE_ONLY})"
    code = (
        "import resource; from ralm.config import RalmConfig, load_config; from ralm.features import pipeline;"
        f"pipeline.run({cfg}, {run_dir!r});"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024);"
        "print(open('/proc/self/smaps_rollup').read())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rss = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("RSS ")][-1]
    # At the end: the driver's own memory (private) vs object-store pages it has mapped reading batches
    # (shared, bounded by the object store's size, not the driver's heap).
    kb = {line.split(":")[0]: float(line.split()[1]) for line in out.stdout.splitlines()
          if line.startswith(("Private_Dirty:", "Shared_Dirty:"))}
    return {"clips": clips, "driver_peak_rss_mb": round(rss, 1),
            "end_private_dirty_mb": round(kb.get("Private_Dirty", 0.0) / 1024, 1),
            "end_shared_dirty_mb": round(kb.get("Shared_Dirty", 0.0) / 1024, 1)}


def memory_main(clips: int, seconds: float, corpus_run: str | None, config: str | None) -> None:
    """Peak RSS of the stage on N clips and on 4N: synthetic clips (CREPE), or an existing run's corpus
    (e.g. the demo's) and 4 copies of it with `--config`'s encoders."""
    runs = []
    for copies in (1, 4):
        with tempfile.TemporaryDirectory() as root:
            if corpus_run:
                run_dir, n = replicate_corpus(corpus_run, root, copies)
            else:
                n = copies * clips
                run_dir = make_corpus(root, n, seconds)
            runs.append(_stage_peak_rss(run_dir, n, config if corpus_run else None))
    print(json.dumps({"bench": "features_memory", "corpus": corpus_run or "synthetic", "runs": runs,
                      "rss_ratio_4x": round(runs[1]["driver_peak_rss_mb"] / runs[0]["driver_peak_rss_mb"], 3),
                      "private_ratio_4x": round(runs[1]["end_private_dirty_mb"]
                                                / max(runs[0]["end_private_dirty_mb"], 1e-9), 3)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", action="store_true", help="peak RSS of the stage on N and 4N clips instead")
    ap.add_argument("--corpus", default=None, help="--memory: a run dir whose corpus (x1, x4) to encode instead")
    ap.add_argument("--clips", type=int, default=400)  # 20 min of audio: start-up is a fixed cost, not the figure
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--pool", type=int, default=None,
                    help="actors per pool (default: shared 1, running cores / actors batches at once; per-encoder: "
                    "the cores shared out among the encoders, at least 1)")
    ap.add_argument("--config", default=None, help="a config whose features section to use (default: defaults)")
    ap.add_argument("--layout", choices=["shared", "per-encoder"], default="shared",
                    help="shared (default): one pool, one actor per node running every encoder on `cores` batches "
                    "at once; per-encoder: a pool per encoder, one actor per core and encoder")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run one plain loop process per core over a split of the clips (no Ray): the ratio the "
                    "cores allow with no framework, and the share of it the pool keeps")
    ap.add_argument("--no-sizing", action="store_true",
                    help="keep the config's num_cpus and threads instead of sizing the pools by the loop's profile")
    ap.add_argument("--loop-only", default=None, help=argparse.SUPPRESS)  # the loop's own process (internal)
    ap.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop_only:
        from ralm.config import load_config

        print(json.dumps(bench_loop(load_config(args.config), args.loop_only, args.spawned_at)))
        return
    if args.memory:
        memory_main(args.clips, args.seconds, args.corpus, args.config)
        return

    import ray

    from ralm.cluster import init_ray
    from ralm.config import load_config

    cfg = load_config(args.config)
    cores = os.cpu_count() or 1
    # One actor per core and encoder: more actors than cores only time-slice the same CPUs (measured on
    # 2 cores, 160 clips: 2 actors per pool 87.9 s, 1 per pool 81.2 s).
    shared = args.layout == "shared"
    # Shared: one actor runs every encoder on `cores` batches at once (threads of one process: the imports
    # and models once, not once per core). Per encoder: one single-batch actor per core and encoder.
    pool = args.pool or (1 if shared else max(1, cores // len(cfg.features.encoders)))
    concurrent = max(1, cores // pool) if shared else 1
    for spec in cfg.features.encoders:
        spec.pool, spec.concurrent_batches = ("shared" if shared else None), concurrent
    with tempfile.TemporaryDirectory() as root:
        run_dir = make_corpus(root, args.clips, args.seconds)
        lp = bench_loop_processes(args.config, [run_dir])  # first: its profile sizes the pools
        # The hardware's own ceiling: one plain loop per core, no Ray (opt-in: ~half the loop's time).
        cp = bench_loop_processes(args.config, split_corpus(run_dir, root, cores)) if args.ceiling else None
        sizes = (size_pools(cfg, lp["encoder_cpu_s"], cores, pool, shared, concurrent) if not args.no_sizing else
                 {s.pool or s.name: {"actors": pool, "num_cpus": s.num_cpus} for s in cfg.features.encoders})
        for spec in cfg.features.encoders:  # sized or not, `pool` actors per pool
            spec.pool_min = spec.pool_max = pool
        init_ray(cfg.ray)
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # as the stage runs it
        ray.data.DataContext.get_current().enable_progress_bars = False
        warmup_s = warm_ray_data()
        p = bench_pool(cfg, run_dir)
        ray.shutdown()
    out = {
        "bench": "features",
        "encoders": [f"{s.name}:{s.model}:{s.layers}" for s in cfg.features.encoders],
        "clips": args.clips, "clip_seconds": args.seconds, "layout": args.layout, "actors_per_pool": pool, "cpus": cores, "pools": sizes,
        "loop_cpu_s_per_clip": {k: round(v / args.clips, 4) for k, v in lp["encoder_cpu_s"].items()},
        "pool_audio_s_per_s": round(p["audio_s_per_s"], 3), "loop_audio_s_per_s": round(lp["audio_s_per_s"], 3),
        "pool_wall_s": round(p["wall_s"], 2), "loop_wall_s": round(lp["wall_s"], 2),
        "ratio": round(p["audio_s_per_s"] / lp["audio_s_per_s"], 3),
        # Ray Data's per-cluster helper actors started before the clock (`warm_ray_data`); with that time added:
        "ray_data_warmup_s": round(warmup_s, 2),
        "ratio_incl_warmup": round(p["audio_s"] / (p["wall_s"] + warmup_s) / lp["audio_s_per_s"], 3),
        # start-up (workers, imports, model loads) until the first encoded clip reaches the caller
        "pool_first_output_s": round(p["first_output_s"], 2), "loop_first_output_s": round(lp["first_output_s"], 2),
        # what a long corpus sees once both are running: the middle half of the audio, same definition for both
        "pool_steady_audio_s_per_s": round(p["steady_audio_s_per_s"], 3),
        "loop_steady_audio_s_per_s": round(lp["steady_audio_s_per_s"], 3),
        "ratio_steady": round(p["steady_audio_s_per_s"] / lp["steady_audio_s_per_s"], 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        # share of the CPU time the hypervisor took during each path (a shared VM's noisy neighbours)
        "steal": {"loop": lp["steal"], "pool": p["steal"], **({"ceiling": cp["steal"]} if cp else {})},
    }
    if cp is not None:  # how much of what the cores give without a framework the pool keeps
        out.update({"ceiling_processes": cores, "ceiling_audio_s_per_s": round(cp["audio_s_per_s"], 3),
                    "ceiling_ratio": round(cp["audio_s_per_s"] / lp["audio_s_per_s"], 3),
                    "pool_of_ceiling": round(p["audio_s_per_s"] / cp["audio_s_per_s"], 3),
                    "ceiling_ratio_steady": round(cp["steady_audio_s_per_s"] / lp["steady_audio_s_per_s"], 3),
                    "pool_of_ceiling_steady": round(p["steady_audio_s_per_s"] / cp["steady_audio_s_per_s"], 3)})
    for other in [r for r in (p, cp) if r is not None]:  # every path encoded the same clips
        assert abs(other["audio_s"] - lp["audio_s"]) < 1e-3 * max(1.0, lp["audio_s"]), (other["audio_s"], lp["audio_s"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
