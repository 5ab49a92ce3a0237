"""The recipe machinery: readers for manifest formats and the declarative `TableRecipe`."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ralm.corpus.surrogate import Segment
from ralm.records import DOMAINS, SPLITS


@dataclass
class RawClip:
    """One clip as a recipe sees it, before its audio is checked."""

    source: str
    rel_path: str  # path relative to the recipe root: part of the stable id
    audio_uri: str
    domain: str
    transcript: str | None = None
    caption: str | None = None
    segments: list[Segment] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    offset_s: float = 0.0
    duration_s: float | None = None


@dataclass
class BadRow:
    """A manifest row that cannot become a clip; it becomes a reject row with this reason."""

    source: str
    where: str  # file:line
    reason: str
    detail: str
    audio_uri: str | None = None


Row = dict[str, Any]
Reader = Callable[[str], Iterator[tuple[int, Row | Exception]]]


def read_csv(text: str) -> Iterator[tuple[int, Row | Exception]]:
    reader = csv.DictReader(io.StringIO(text))
    for i, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            yield i, ValueError(f"expected {len(reader.fieldnames or [])} columns, got a different count")
        else:
            yield i, {k.strip(): v.strip() for k, v in row.items()}


def read_jsonl(text: str) -> Iterator[tuple[int, Row | Exception]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, ValueError(f"not valid JSON: {e.msg}")
            continue
        yield i, obj if isinstance(obj, dict) else ValueError("a line must hold a JSON object")


def read_id_text(text: str) -> Iterator[tuple[int, Row | Exception]]:
    """LibriSpeech `*.trans.txt`: `<utterance-id> <TRANSCRIPT>` per line."""
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            yield i, ValueError("expected '<id> <transcript>'")
        else:
            yield i, {"id": parts[0], "text": parts[1]}


READERS: dict[str, Reader] = {"csv": read_csv, "jsonl": read_jsonl, "id_text": read_id_text}

Getter = str | Callable[[Row], Any] | None


def _get(row: Row, getter: Getter) -> Any:
    if getter is None:
        return None
    if callable(getter):
        return getter(row)
    return row.get(getter)


@dataclass(frozen=True)
class TableRecipe:
    """A dataset layout, declared: manifest glob + reader + how a row maps onto a clip.

    `audio` is a format string over the row's columns; it is resolved against the manifest's folder
    (`audio_base="manifest"`) or the recipe root (`"root"`). Options in the config's recipe spec may
    override `manifest`, `audio`, `audio_base` and `domain` (for layouts that differ slightly).
    """

    name: str
    manifest: str
    reader: str
    audio: str
    domain: Getter
    audio_base: str = "manifest"
    transcript: Getter = None
    caption: Getter = None
    segments: Getter = None
    split: Getter = None
    metadata: Mapping[str, Getter] = field(default_factory=dict)
    metadata_column: str | None = None  # a column holding a dict of extra metadata

    def scan(self, root: str, options: Mapping[str, Any] | None = None) -> Iterator[RawClip | BadRow]:
        opts = dict(options or {})
        manifest_glob = opts.pop("manifest", self.manifest)
        audio_fmt = opts.pop("audio", self.audio)
        audio_base = opts.pop("audio_base", self.audio_base)
        domain_override = opts.pop("domain", None)
        if opts:
            raise ValueError(f"recipe {self.name}: unknown options {sorted(opts)}")
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"recipe {self.name}: root folder {root} does not exist")
        manifests = sorted(glob.glob(os.path.join(root, manifest_glob), recursive=True))
        if not manifests:
            raise FileNotFoundError(f"recipe {self.name}: no manifest matching {manifest_glob!r} under {root}")
        for manifest in manifests:
            with open(manifest, encoding="utf-8", errors="replace") as f:
                text = f.read()
            base = os.path.dirname(manifest) if audio_base == "manifest" else root
            for line, row in READERS[self.reader](text):
                where = f"{os.path.relpath(manifest, root)}:{line}"
                if isinstance(row, Exception):
                    yield BadRow(self.name, where, "malformed_row", f"{where}: {row}")
                    continue
                try:
                    yield self._clip(row, root, base, audio_fmt, domain_override)
                except (KeyError, ValueError, TypeError) as e:
                    yield BadRow(self.name, where, "malformed_row", f"{where}: {type(e).__name__}: {e}")

    def _clip(self, row: Row, root: str, base: str, audio_fmt: str, domain_override: str | None) -> RawClip:
        try:
            rel_audio = audio_fmt.format(**row)
        except KeyError as e:
            raise KeyError(f"column {e} needed by audio path {audio_fmt!r} is missing") from None
        if not rel_audio.strip():
            raise ValueError("empty audio path")
        path = os.path.normpath(os.path.join(base, rel_audio))
        domain = domain_override or _get(row, self.domain)
        if domain not in DOMAINS:
            raise ValueError(f"domain {domain!r} is not one of {DOMAINS}")
        split = _get(row, self.split) or None
        if split is not None and split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        metadata: dict[str, str] = {}
        if self.metadata_column:
            extra = row.get(self.metadata_column) or {}
            if not isinstance(extra, dict):
                raise ValueError(f"{self.metadata_column} must be a mapping")
            metadata.update({str(k): str(v) for k, v in extra.items() if v is not None})
        for key, getter in self.metadata.items():
            value = _get(row, getter)
            if value not in (None, ""):
                metadata[key] = str(value)
        transcript = _get(row, self.transcript) or None
        caption = _get(row, self.caption) or None
        segments = _get(row, self.segments) or None
        if segments is not None:
            segments = [Segment(float(s["start"]), float(s["end"]), str(s["text"]), s.get("speaker"))
                        for s in segments]
        if transcript:
            metadata.setdefault("transcript", transcript)
        if caption:
            metadata.setdefault("caption", caption)
        offset = float(row.get("offset_s") or 0.0)
        dur = row.get("duration_s")
        return RawClip(
            source=self.name,
            rel_path=os.path.relpath(path, root),
            audio_uri=path,
            domain=domain,
            transcript=transcript,
            caption=caption,
            segments=segments,
            metadata=metadata,
            split=split,
            offset_s=offset,
            duration_s=float(dur) if dur not in (None, "") else None,
        )


class Recipe:
    """Protocol-like base for recipes that need more than a table (e.g. the demo synthesizes first)."""

    name: str

    def scan(self, root: str, options: Mapping[str, Any] | None = None) -> Iterator[RawClip | BadRow]:
        raise NotImplementedError


RECIPES: dict[str, TableRecipe | Recipe] = {}


def register_recipe(recipe: TableRecipe | Recipe) -> TableRecipe | Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> TableRecipe | Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; registered: {sorted(RECIPES)}") from None
