"""Training data: feature shards (WebDataset tars, keyed by clip) joined with (prompt, target) pairs by
clip id, split across workers, bucketed by length and collated.

Each epoch every train sample is seen once across workers: shards are permuted by (seed, epoch) and dealt
round-robin to workers (or, with fewer shards than workers, samples are dealt round-robin). Within a
worker a buffer of samples is sorted by length and cut into batches (little padding), whose order is
then shuffled. Everything is deterministic given (seed, epoch, rank, world size), so a resumed worker
skips the batches it already trained on.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ralm import records, storage

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- inputs
def features_uri(cfg: Any, run_dir: str) -> str:
    return cfg.stage_uri("features", run_dir)


def read_encoders(cfg: Any, run_dir: str) -> list[dict[str, Any]]:
    uri = storage.join(features_uri(cfg, run_dir), "encoders.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: run the features stage first")
    encs = storage.read_json(uri)
    if isinstance(encs, dict):  # {"encoders": [...], "shards_uri": ...}
        encs = encs.get("encoders", [])
    if not encs:
        raise ValueError(f"{uri} lists no encoders")
    return encs


def shard_uris(cfg: Any, run_dir: str, split: str = "train") -> list[str]:
    """The feature shards of `split` (`train.shards.uri` if set, else the features stage's)."""
    from ralm.features.shards import list_shards

    root = cfg.shards.uri or features_uri(cfg, run_dir)
    found = [str(u) for u in list_shards(root, split=split)]
    if not found:
        raise FileNotFoundError(f"no feature shards of split {split!r} under {root}: run the features stage first")
    return sorted(found)


def iter_shard(uri: str) -> Iterator[dict[str, Any]]:
    from ralm.features.shards import iter_shard as reader

    yield from reader(uri)


def shard_clip_ids(uri: str) -> list[str]:
    """Clip ids in a shard from the tar headers only (no feature arrays are decoded)."""
    fs, path = storage.filesystem(uri)
    out: list[str] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for name in tar.getnames():
            key, _, ext = name.rpartition("/")[2].partition(".")
            if ext == "json":
                out.append(key)
    return out


@dataclass
class TargetPair:
    id: str
    prompt: str
    target: str


def target_source(cfg: Any, run_dir: str) -> tuple[str, str]:
    """(stage uri, column) holding the training targets, per `train.targets`."""
    rephrase = (cfg.stage_uri("rephrase", run_dir), cfg.train.rephrase_field)
    generate = (cfg.stage_uri("generate", run_dir), "response")
    choice = cfg.train.targets
    if choice == "rephrase":
        return rephrase
    if choice == "generate":
        return generate
    for uri, col in (rephrase, generate):  # auto: rephrased targets when that stage produced any
        if records.part_uris(records.data_uri(uri)):
            return uri, col
    raise FileNotFoundError(f"no targets: neither {rephrase[0]}/data nor {generate[0]}/data has parts")


def load_targets(cfg: Any, run_dir: str, split: str = "train") -> dict[str, list[TargetPair]]:
    """clip_id -> its (prompt, target) pairs of `split`. Rows without a prompt or target are skipped."""
    uri, col = target_source(cfg, run_dir)
    if not records.part_uris(records.data_uri(uri)):
        raise FileNotFoundError(f"no targets: {records.data_uri(uri)} has no parts (train.targets={cfg.train.targets})")
    out: dict[str, list[TargetPair]] = {}
    skipped = 0
    for row in records.iter_records(records.data_uri(uri), columns=["id", "clip_id", "split", "prompt", col]):
        if row["split"] != split:
            continue
        if not row.get("prompt") or not row.get(col):
            skipped += 1
            continue
        out.setdefault(row["clip_id"], []).append(TargetPair(row["id"], row["prompt"], row[col]))
    if skipped:
        log.warning("%d %s rows without prompt or %s skipped", skipped, split, col)
    for pairs in out.values():
        pairs.sort(key=lambda p: p.id)
    return out


# ---------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    id: str
    clip_id: str
    features: dict[str, np.ndarray]
    suffix_ids: list[int]
    target_ids: list[int]
    length: int  # tokens the LLM sees: prefix + audio block + suffix + target


@dataclass
class Plan:
    """Which part of the data this worker reads in one epoch."""

    shards: list[str]
    stride: int = 1  # deal samples round-robin when there are fewer shards than workers
    offset: int = 0


def plan_epoch(shards: list[str], rank: int, world: int, seed: int, epoch: int) -> Plan:
    order = list(shards)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= world:
        return Plan(order[rank::world])
    return Plan(order, stride=world, offset=rank)


Encoder = Callable[[str, str], tuple[list[int], list[int]]]


def iter_examples(plan: Plan, targets: dict[str, list[TargetPair]], encode: Encoder,
                  audio_tokens: Callable[[dict[str, int]], int], prefix_len: int, max_length: int,
                  stats: dict[str, int] | None = None) -> Iterator[Example]:
    """Join shard samples with their targets; one Example per (clip, prompt, target)."""
    stats = stats if stats is not None else {}
    index = -1
    for uri in plan.shards:
        for sample in iter_shard(uri):
            for pair in targets.get(sample["clip_id"], []):
                index += 1
                if index % plan.stride != plan.offset:
                    continue
                feats = sample["features"]
                n_audio = audio_tokens({k: v.shape[1] for k, v in feats.items()})
                suffix, target = encode(pair.prompt, pair.target)
                room = max_length - prefix_len - n_audio - len(suffix)
                if room <= 0:
                    stats["too_long"] = stats.get("too_long", 0) + 1
                    continue
                if len(target) > room:  # responses may be truncated anyway (ALARM keeps them)
                    stats["truncated"] = stats.get("truncated", 0) + 1
                    target = target[:room]
                yield Example(pair.id, sample["clip_id"], feats, suffix, target,
                              prefix_len + n_audio + len(suffix) + len(target))


def bucket_batches(examples: Iterable[Example], batch_size: int, buffer_batches: int, seed: int
                   ) -> Iterator[list[Example]]:
    """Sort a buffer of `batch_size * buffer_batches` examples by length, cut it into batches, shuffle
    the batch order: similar lengths share a batch, so padding stays small."""
    rng = random.Random(seed)
    buf: list[Example] = []

    def flush() -> Iterator[list[Example]]:
        buf.sort(key=lambda e: (e.length, e.id))
        batches = [buf[i: i + batch_size] for i in range(0, len(buf), batch_size)]
        rng.shuffle(batches)
        yield from batches
        buf.clear()

    for ex in examples:
        buf.append(ex)
        if len(buf) >= batch_size * buffer_batches:
            yield from flush()
    if buf:
        yield from flush()


@dataclass
class PaddingMeter:
    real: int = 0
    padded: int = 0

    def add(self, lengths: list[int]) -> None:
        self.real += sum(lengths)
        self.padded += max(lengths) * len(lengths)

    @property
    def percent(self) -> float:
        return 100.0 * (1 - self.real / self.padded) if self.padded else 0.0


def collate(batch: list[Example], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Examples -> {features: {enc: (B, L, T, d)}, feature_lens: {enc: (B,)}, suffix_ids, target_ids, ids}."""
    feats, lens = {}, {}
    for name in batch[0].features:
        arrs = [ex.features[name] for ex in batch]
        n = torch.tensor([a.shape[1] for a in arrs])
        out = torch.zeros(len(arrs), arrs[0].shape[0], int(n.max()), arrs[0].shape[2], dtype=dtype)
        for i, a in enumerate(arrs):
            out[i, :, : a.shape[1]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        feats[name], lens[name] = out, n
    return {"features": feats, "feature_lens": lens, "suffix_ids": [ex.suffix_ids for ex in batch],
            "target_ids": [ex.target_ids for ex in batch], "ids": [ex.id for ex in batch],
            "lengths": [ex.length for ex in batch]}


def count_samples(shards: list[str], targets: dict[str, list[TargetPair]]) -> int:
    return sum(len(targets.get(c, [])) for uri in shards for c in shard_clip_ids(uri))
