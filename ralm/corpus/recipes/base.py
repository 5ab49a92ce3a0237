"""The recipe machinery: readers for manifest formats and the declarative `TableRecipe`."""

from __future__ import annotations

import csv
import itertools
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ralm import storage
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
Reader = Callable[..., Iterator[tuple[int, Row | Exception]]]


def read_csv(lines: Iterable[str], delimiter: str = ",", columns: list[str] | None = None,
             quoting: int = csv.QUOTE_MINIMAL) -> Iterator[tuple[int, Row | Exception]]:
    """A delimited table with a header row, or headerless with `columns` naming the fields."""
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB would end a table at its first long transcript
    reader = csv.DictReader(lines, fieldnames=columns, delimiter=delimiter, quoting=quoting)
    first = 1 if columns else 2  # the line number of the first data row
    try:
        for i, row in enumerate(reader, start=first):
            if None in row or any(v is None for v in row.values()):
                yield i, ValueError(f"expected {len(reader.fieldnames or [])} columns, got a different count")
            else:
                yield i, {k.strip(): v.strip() for k, v in row.items()}
    except csv.Error as e:  # e.g. a quote left open to the end of the file
        yield reader.line_num, ValueError(f"not a valid table from here on: {e}")


def read_tsv(lines: Iterable[str], delimiter: str = "\t", columns: list[str] | None = None,
             quoting: int = csv.QUOTE_NONE) -> Iterator[tuple[int, Row | Exception]]:
    """Tab-separated (Common Voice): quotes are text, not quoting."""
    return read_csv(lines, delimiter=delimiter, columns=columns, quoting=quoting)


def read_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, Row | Exception]]:
    """JSON lines; a file holding one JSON list of objects is read too (its items numbered from 1)."""
    rest = iter(lines)
    first = next(rest, "")
    if first.lstrip().startswith("["):  # one JSON document: it has to be read whole
        text = first + "".join(rest)
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None  # not one document: read it line by line below
        if isinstance(items, list):
            for i, obj in enumerate(items, start=1):
                yield i, obj if isinstance(obj, dict) else ValueError("an item must be a JSON object")
            return
        rest = iter(text.splitlines()[1:])
    for i, line in enumerate(itertools.chain([first], rest), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, ValueError(f"not valid JSON: {e.msg}")
            continue
        yield i, obj if isinstance(obj, dict) else ValueError("a line must hold a JSON object")


def read_id_text(lines: Iterable[str]) -> Iterator[tuple[int, Row | Exception]]:
    """LibriSpeech `*.trans.txt`: `<utterance-id> <TRANSCRIPT>` per line."""
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            yield i, ValueError("expected '<id> <transcript>'")
        else:
            yield i, {"id": parts[0], "text": parts[1]}


READERS: dict[str, Reader] = {"csv": read_csv, "tsv": read_tsv, "jsonl": read_jsonl, "id_text": read_id_text}
READER_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "id_text"}
TABLE_READERS = ("csv", "tsv")  # the readers that take `delimiter` / `columns` / `quotes`
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                 "dev": "valid", "test": "test", "testing": "test"}

Getter = str | Callable[[Row], Any] | None


def _get(row: Row, getter: Getter) -> Any:
    if getter is None:
        return None
    if callable(getter):
        return getter(row)
    return row.get(getter)


def _split_name(value: Any) -> str | None:
    """A split as datasets spell it (dev, validation, training...) -> train / valid / test."""
    if value in (None, ""):
        return None
    split = SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        others = "/".join(a for a in SPLIT_ALIASES if a not in SPLITS)
        raise ValueError(f"split {value!r} is not one of {SPLITS} (or {others})")
    return split


def checked_options(recipe: str, options: Mapping[str, Any] | None,
                    allowed: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A recipe spec's `options`, each one known to the recipe and of its type (the error names the bad one)."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"recipe {recipe}: unknown options {unknown}; it takes {sorted(allowed)}")
    for key, value in opts.items():
        if not isinstance(value, allowed[key]):
            raise ValueError(f"recipe {recipe}: option {key} = {value!r} has the wrong type")
    return opts


# What `options:` of a recipe spec may set on a table recipe, and the type each takes. Column options name a
# column of the row; `metadata` maps a metadata key to a column (added to the recipe's own).
TABLE_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "manifest": (str, list), "reader": str, "delimiter": str, "columns": list, "quotes": bool, "audio": str,
    "audio_base": str, "domain": str, "domain_column": str, "transcript": str, "caption": str, "segments": str,
    "split": str, "split_from_file": bool, "metadata": dict,
}


@dataclass(frozen=True)
class TableRecipe:
    """A dataset layout, declared: manifest glob(s) + reader + how a row maps onto a clip.

    `audio` is a format string over the row's columns, resolved against the manifest's folder
    (`audio_base="manifest"`) or the recipe root (`"root"`). `domain` is a fixed domain name or a function
    of the row, `domain_column` a column holding it; `transcript`, `caption`, `segments`, `split` and the
    values of `metadata` are column names (or functions of the row). `split_from_file` takes the split from
    the manifest's name (Common Voice's `dev.tsv`). Every field can be set from the config's recipe spec
    (`options:`, see `TABLE_OPTIONS`), so a new layout needs no code: the `table` recipe is this class with
    nothing preset. The root may be a local folder or a URI (s3://bucket/dataset).
    """

    name: str
    manifest: str | tuple[str, ...] | None
    reader: str | None
    audio: str | None
    domain: Getter
    audio_base: str = "manifest"
    delimiter: str | None = None
    columns: tuple[str, ...] | None = None  # a headerless table's column names
    quotes: bool | None = None  # whether `"` quotes a field (csv: yes, tsv: no); LJSpeech's text has bare quotes
    domain_column: str | None = None
    transcript: Getter = None
    caption: Getter = None
    segments: Getter = None
    split: Getter = None
    split_from_file: bool = False
    metadata: Mapping[str, Getter] = field(default_factory=dict)
    metadata_column: str | None = None  # a column holding a dict of extra metadata

    def configured(self, options: Mapping[str, Any] | None = None) -> TableRecipe:
        """This recipe with the spec's `options` applied and checked (a clear error names the bad option)."""
        opts = checked_options(self.name, options, TABLE_OPTIONS)
        if "manifest" in opts:
            opts["manifest"] = tuple(opts["manifest"]) if isinstance(opts["manifest"], list) else opts["manifest"]
        if "columns" in opts:
            opts["columns"] = tuple(str(c) for c in opts["columns"])
        if "metadata" in opts:
            opts["metadata"] = {**self.metadata, **{str(k): str(v) for k, v in opts["metadata"].items()}}
        if "domain" in opts and "domain_column" not in opts:  # a fixed domain wins over the recipe's column
            opts["domain_column"] = None
        recipe = replace(self, **opts)
        recipe._check()
        return recipe

    def _check(self) -> None:
        where = f"recipe {self.name}"
        for key in ("manifest", "audio"):
            if not getattr(self, key):
                raise ValueError(f"{where}: options.{key} is required (e.g. {_EXAMPLES[key]})")
        if self.domain is None and self.domain_column is None:
            raise ValueError(f"{where}: set options.domain (one of {DOMAINS}) or options.domain_column")
        if isinstance(self.domain, str) and self.domain not in DOMAINS:
            raise ValueError(f"{where}: domain {self.domain!r} is not one of {DOMAINS}")
        if self.reader is not None and self.reader not in READERS:
            raise ValueError(f"{where}: reader {self.reader!r} is not one of {sorted(READERS)}")
        if (self.delimiter or self.columns or self.quotes is not None) and self.reader not in (*TABLE_READERS, None):
            raise ValueError(f"{where}: delimiter/columns/quotes apply to the {TABLE_READERS} readers, not {self.reader}")
        if self.audio_base not in ("manifest", "root"):
            raise ValueError(f"{where}: audio_base must be 'manifest' or 'root', not {self.audio_base!r}")

    def _reader(self, manifest: str) -> Callable[[Iterable[str]], Iterator[tuple[int, Row | Exception]]]:
        name = self.reader or READER_BY_SUFFIX.get(os.path.splitext(manifest)[1].lower())
        if name is None:
            raise ValueError(f"recipe {self.name}: cannot tell how to read {manifest}; set options.reader "
                             f"(one of {sorted(READERS)})")
        if name not in TABLE_READERS:
            return READERS[name]
        kwargs: dict[str, Any] = {"columns": list(self.columns) if self.columns else None}
        if self.delimiter:
            kwargs["delimiter"] = self.delimiter.encode().decode("unicode_escape")  # "\t" in YAML means a tab
        if self.quotes is not None:
            kwargs["quoting"] = csv.QUOTE_MINIMAL if self.quotes else csv.QUOTE_NONE
        return lambda lines: READERS[name](lines, **kwargs)

    def scan(self, root: str, options: Mapping[str, Any] | None = None) -> Iterator[RawClip | BadRow]:
        recipe = self.configured(options)
        root = recipe_root(self.name, root)
        globs = (recipe.manifest,) if isinstance(recipe.manifest, str) else tuple(recipe.manifest or ())
        manifests = sorted({m for g in globs for m in storage.glob(root, g)})
        if not manifests:
            raise FileNotFoundError(f"recipe {self.name}: no manifest matching {list(globs)} under {root}")
        for manifest in manifests:
            read = recipe._reader(manifest)
            base = posixpath.dirname(manifest) if recipe.audio_base == "manifest" else root
            file_split = posixpath.basename(manifest).split(".")[0] if recipe.split_from_file else None
            # Streamed line by line: a corpus manifest of millions of rows is never held whole.
            with storage.open_text(manifest) as lines:
                for line, row in read(lines):
                    where = f"{storage.relative(manifest, root)}:{line}"
                    if isinstance(row, Exception):
                        yield BadRow(self.name, where, "malformed_row", f"{where}: {row}")
                        continue
                    try:
                        yield recipe._clip(row, root, base, file_split)
                    except (KeyError, ValueError, TypeError) as e:
                        yield BadRow(self.name, where, "malformed_row", f"{where}: {type(e).__name__}: {e}")

    def _clip(self, row: Row, root: str, base: str, file_split: str | None) -> RawClip:
        assert self.audio is not None  # checked by `configured`
        try:
            rel_audio = self.audio.format(**row)
        except KeyError as e:
            raise KeyError(f"column {e} needed by audio path {self.audio!r} is missing") from None
        if not rel_audio.strip():
            raise ValueError("empty audio path")
        path = storage.resolve(base, rel_audio)
        if self.domain_column:
            domain = row.get(self.domain_column)
        else:  # a fixed domain, or a function of the row
            domain = self.domain if isinstance(self.domain, str) or self.domain is None else self.domain(row)
        if domain not in DOMAINS:
            raise ValueError(f"domain {domain!r} is not one of {DOMAINS}")
        split = _split_name(file_split if self.split_from_file else _get(row, self.split))
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
            rel_path=storage.relative(path, root),
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


_EXAMPLES = {"manifest": "metadata.csv or [train.tsv, test.tsv]", "audio": "'wavs/{file_name}'"}


def recipe_root(name: str, root: str) -> str:
    """A recipe's root folder: a local path (made absolute) or a URI (s3://bucket/data); it must exist."""
    root = storage.absolute(os.path.expanduser(root)).rstrip("/") or "/"
    if not storage.isdir(root):
        raise FileNotFoundError(f"recipe {name}: root folder {root} does not exist")
    return root


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
