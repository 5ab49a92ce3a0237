"""Benchmark loaders (MMAU, MMSU, MMAR, the demo's held-out MCQ) -> one `MCQItem` shape.

Each benchmark is a small class registered by name: how to read its file, which scoring rule its
official scorer uses, and which fields group the report. Audio paths in the files are relative to an
audio root given on the command line (default: the data file's folder); absolute paths and URIs are kept.
Items that cannot be used (no choices, an answer that is not one of the choices...) become rejects with a
reason instead of stopping the run.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ralm import storage
from ralm.eval.scoring import LETTERS, tokens


@dataclass
class MCQItem:
    id: str
    audio: str  # resolved URI (local path or s3://)
    question: str
    choices: list[str]
    answer_index: int
    domain: str | None = None  # MMAU task / MMAR modality / MMSU "speech"
    category: str | None = None
    difficulty: str | None = None
    subcategory: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the original item, echoed in the submission file

    @property
    def answer(self) -> str:
        return self.choices[self.answer_index]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def group_value(self, key: str) -> str | None:
        """A report grouping: a field of the item, else the original item's `key` or `key_name`."""
        if key in _ITEM_FIELDS:
            return getattr(self, key)
        return _str(self.raw.get(key, self.raw.get(f"{key}_name")))


_ITEM_FIELDS = {"id", "audio", "question", "domain", "category", "difficulty", "subcategory"}


@dataclass
class Loaded:
    items: list[MCQItem]
    rejects: list[dict[str, Any]]  # {"id", "reason", "detail"}


class BadItem(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------- file helpers
def read_items(path: str) -> Iterable[dict[str, Any]]:
    """A JSON list (or {"data": [...]}), JSON lines, CSV, TSV or Parquet (by extension), local or s3://.
    Parquet is read a batch of rows at a time: a file with its clips embedded can outgrow memory."""
    ext = path.lower().rsplit(".", 1)[-1]
    try:
        if ext == "parquet":
            return _parquet_rows(path)
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark file {path} does not exist") from None
    text = raw.decode("utf-8-sig")
    if ext in ("csv", "tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if ext == "tsv" else ","))
    try:  # a JSON document: a list, or {"data": [...]}
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("data", [data])
    except json.JSONDecodeError:  # JSON lines
        data = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path}: expected a list of JSON objects")
    return data


def _parquet_rows(path: str, batch_rows: int = 64) -> Iterator[dict[str, Any]]:
    """The file opened (and its footer checked) now; its rows read as the caller goes."""
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> ValueError:
        return ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})")

    fs, local = storage.filesystem(path)
    f = fs.open(local, "rb")  # pre_buffer off below: on, pyarrow reads every row group up front
    try:
        batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_rows)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        f.close()
        raise unreadable(e) from None

    def rows() -> Iterator[dict[str, Any]]:
        with f:
            try:
                for batch in batches:
                    yield from batch.to_pylist()
            except OSError as e:  # a damaged row group further in
                raise unreadable(e) from None
    return rows()


def write_embedded_audio(item: dict[str, Any], audio_dir: str) -> dict[str, Any]:
    """`item` with each embedded clip (`{"bytes": ..., "path": ...}`) replaced by the URI of a file under
    `audio_dir` named by its content (a rerun, or the same clip in two items, writes nothing again)."""
    out = dict(item)
    for key, value in item.items():
        if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray) and value["bytes"]:
            ext = os.path.splitext(str(value.get("path") or ""))[1].lower() or ".wav"
            uri = storage.join(audio_dir, hashlib.sha1(value["bytes"]).hexdigest()[:20] + ext)
            uri = uri if "://" in uri else os.path.abspath(uri)  # not read as relative to the audio root
            if not storage.exists(uri):
                storage.write_bytes_atomic(uri, bytes(value["bytes"]))
            out[key] = uri
    return out


def resolve_audio(path: str, audio_root: str | None, data_path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    root = audio_root if audio_root else os.path.dirname(data_path) or "."
    rel = path[2:] if path.startswith("./") else path
    return storage.join(root, rel) if "://" in root else os.path.normpath(os.path.join(root, rel))


def answer_index(answer: str, choices: list[str]) -> int:
    """Exact text first, then case/space-insensitive, then same word tokens."""
    if answer in choices:
        return choices.index(answer)
    norm = [c.strip().lower() for c in choices]
    if answer.strip().lower() in norm:
        return norm.index(answer.strip().lower())
    same = [i for i, c in enumerate(choices) if tokens(c) == tokens(answer) and tokens(answer)]
    if len(same) == 1:
        return same[0]
    raise BadItem("answer_not_in_choices", f"answer {answer!r} is not one of the choices {choices}")


def _need(item: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if item.get(k) not in (None, ""):
            return item[k]
    raise BadItem("missing_field", f"no {' / '.join(keys)}")


def _choices(values: Any) -> list[str]:
    if not isinstance(values, list | tuple) or len(values) < 2:
        n = len(values) if isinstance(values, list | tuple) else 0
        raise BadItem("too_few_choices", f"{n} choice(s)")
    return [str(c) for c in values]


def _str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


# ---------------------------------------------------------------------------------------------- registry
class Benchmark:
    name: str = ""
    scorer: str = "string_match"
    group_keys: tuple[str, ...] = ("domain", "category", "difficulty")

    def __init__(self, fields: Any = None) -> None:
        self.fields = fields  # `eval.fields`: only the mapped benchmark (mcq) reads it

    def parse(self, item: dict[str, Any], n: int, audio_root: str | None, data_path: str) -> MCQItem:
        raise NotImplementedError

    def item_id(self, item: dict[str, Any], n: int) -> str:
        """The item's id (its row number `n` when it has none), for its reject too."""
        return str(item.get("id", n))

    def load(self, path: str, audio_root: str | None = None, limit: int | None = None,
             audio_dir: str | None = None) -> Loaded:
        """`audio_dir`: where clips embedded in the file (a Hugging Face Audio column, as its Parquet exports
        hold them) are written out, once, so the inference workers read them as any other clip."""
        items, rejects = [], []
        for n, raw in enumerate(read_items(path)):
            if audio_dir:
                raw = write_embedded_audio(raw, audio_dir)
            try:
                items.append(self.parse(raw, n, audio_root, path))
            except BadItem as e:
                rejects.append({"id": self.item_id(raw, n), "reason": e.reason, "detail": e.detail})
            if limit and len(items) >= limit:
                break
        return Loaded(items, rejects)

    def submission_row(self, item: MCQItem, pred_index: int | None, raw_output: str) -> dict[str, Any]:
        """The original item + the prediction under the keys the official scorers read.

        `model_output` (MMAU's evaluation.py) and `model_prediction` (its other versions and MMAR's) hold
        the chosen choice's text, or "" when the reply was unparsed (the scorer counts it wrong).
        """
        row = dict(item.raw)
        pred = "" if pred_index is None else item.choices[pred_index]
        row["model_output"] = pred
        row["model_prediction"] = pred
        row["raw_output"] = raw_output
        return row


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register(name: str) -> Callable[[type[Benchmark]], type[Benchmark]]:
    def deco(cls: type[Benchmark]) -> type[Benchmark]:
        cls.name = name
        BENCHMARKS[name] = cls
        return cls

    return deco


def get_benchmark(name: str, fields: Any = None) -> Benchmark:
    """The benchmark `name`; `fields` (`eval.fields`) maps a file's columns for the `mcq` one."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; registered: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name](fields)


def load_benchmark(name: str, path: str, audio_root: str | None = None, limit: int | None = None,
                   fields: Any = None, audio_dir: str | None = None) -> Loaded:
    return get_benchmark(name, fields).load(path, audio_root, limit, audio_dir)


# ---------------------------------------------------------------------------------------------- benchmarks
@register("mmau")
class MMAU(Benchmark):
    """JSON list: id, audio_id, question, choices, answer, task (sound|music|speech), category, difficulty."""

    def parse(self, item: dict[str, Any], n: int, audio_root: str | None, data_path: str) -> MCQItem:
        choices = _choices(item.get("choices"))
        return MCQItem(
            id=str(item.get("id", n)),
            audio=resolve_audio(str(_need(item, "audio_id", "audio", "audio_path")), audio_root, data_path),
            question=str(_need(item, "question")),
            choices=choices,
            answer_index=answer_index(str(_need(item, "answer")), choices),
            domain=_str(item.get("domain") or item.get("task")),
            category=_str(item.get("category")),
            difficulty=_str(item.get("difficulty")),
            subcategory=_str(item.get("sub-category")),
            raw=item,
        )


@register("demo")
class DemoMCQ(MMAU):
    """The demo's held-out MCQ file (`ralm.eval.mcq.build_demo_mcq`): MMAU's format, ralm's 4 domains."""


@register("mmar")
class MMAR(Benchmark):
    """JSON lines (or a list): id, audio_path, question, choices, answer, modality, category, sub-category."""

    group_keys = ("domain", "category", "subcategory")

    def parse(self, item: dict[str, Any], n: int, audio_root: str | None, data_path: str) -> MCQItem:
        choices = _choices(item.get("choices"))
        return MCQItem(
            id=str(item.get("id", n)),
            audio=resolve_audio(str(_need(item, "audio_path", "audio", "audio_id")), audio_root, data_path),
            question=str(_need(item, "question")),
            choices=choices,
            answer_index=answer_index(str(_need(item, "answer")), choices),
            domain=_str(item.get("modality")),
            category=_str(item.get("category")),
            subcategory=_str(item.get("sub-category")),
            raw=item,
        )


@register("mmsu")
class MMSU(Benchmark):
    """JSON lines: id, audio_path, question, choice_a..choice_d, answer_gt (the text or the letter), category."""

    scorer = "letter"
    group_keys = ("category", "subcategory", "task")

    def parse(self, item: dict[str, Any], n: int, audio_root: str | None, data_path: str) -> MCQItem:
        choices = _choices([item[f"choice_{c}"] for c in "abcdefgh" if item.get(f"choice_{c}") not in (None, "")])
        gold = str(_need(item, "answer_gt")).strip()
        if len(gold) == 1 and gold.upper() in LETTERS[: len(choices)] and gold not in choices:
            idx = LETTERS.index(gold.upper())
        else:
            idx = answer_index(gold, choices)
        return MCQItem(
            id=str(item.get("id", n)),
            audio=resolve_audio(str(_need(item, "audio_path", "audio", "audio_id")), audio_root, data_path),
            question=str(_need(item, "question")),
            choices=choices,
            answer_index=idx,
            domain="speech",
            category=_str(item.get("category")),
            subcategory=_str(item.get("sub-category")),
            raw=item,
        )

    def submission_row(self, item: MCQItem, pred_index: int | None, raw_output: str) -> dict[str, Any]:
        row = super().submission_row(item, pred_index, raw_output)
        row["predicted_answer"] = "" if pred_index is None else LETTERS[pred_index]
        return row


@register("mcq")
class MappedMCQ(Benchmark):
    """Any multiple-choice file, its columns named in `eval.fields` (`ralm.config.McqFields`): a benchmark
    without code, as a table recipe is a corpus without code."""

    def __init__(self, fields: Any = None) -> None:
        from ralm.config import McqFields

        super().__init__(fields if fields is not None else McqFields())
        f = self.fields
        self.scorer = f.scorer
        self.group_keys = tuple(dict.fromkeys((["domain"] if f.domain else []) + list(f.group_by)))

    def item_id(self, item: dict[str, Any], n: int) -> str:
        f = self.fields
        return str(item[f.id]) if f.id and item.get(f.id) not in (None, "") else str(n)

    def parse(self, item: dict[str, Any], n: int, audio_root: str | None, data_path: str) -> MCQItem:
        f = self.fields
        mapped = [f.audio, f.question, f.answer, *([f.choices] if isinstance(f.choices, str) else f.choices),
                  *([f.domain] if f.domain else [])]
        absent = [c for c in mapped if c not in item]
        if absent:  # eval.fields names a column the file does not have: say which ones it has
            raise BadItem("missing_column", f"no column {', '.join(map(repr, absent))} in the file (it has: "
                          f"{', '.join(map(str, item))}); map them in eval.fields")
        audio = _need(item, f.audio)
        if isinstance(audio, dict):  # a Hugging Face Audio column: {"bytes": ..., "path": ...}, not written out
            raise BadItem("embedded_audio", f"column {f.audio!r} holds the audio itself, not a path (the eval "
                          "stage writes such clips out; a bare load() needs audio_dir)")
        if isinstance(f.choices, str):
            choices = _choices(_as_list(item.get(f.choices), f.choices))
        else:
            choices = _choices([item[c] for c in f.choices if item.get(c) not in (None, "")])
        return MCQItem(
            id=self.item_id(item, n),
            audio=resolve_audio(str(audio), audio_root, data_path),
            question=str(_need(item, f.question)),
            choices=choices,
            answer_index=_mapped_answer(_need(item, f.answer), choices, f.answer_format),
            domain=_str(item.get(f.domain)) if f.domain else None,
            raw={k: v for k, v in item.items() if not isinstance(v, bytes | bytearray)},
        )


def _as_list(value: Any, column: str) -> Any:
    """A choices cell: a list, or its text from a CSV (`["a", "b"]` as JSON, `['a', 'b']` as Python writes it)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise BadItem("bad_choices", f"column {column!r} is not a list: {value[:80]!r}") from None
    return value


def _mapped_answer(value: Any, choices: list[str], answer_format: str) -> int:
    text = str(value).strip()
    if answer_format in ("index0", "index1"):
        try:
            idx = int(text) - (answer_format == "index1")
        except ValueError:
            raise BadItem("bad_answer", f"answer {value!r} is not an index") from None
        if not 0 <= idx < len(choices):
            raise BadItem("answer_not_in_choices", f"answer index {value!r} ({answer_format}) for "
                          f"{len(choices)} choices")
        return idx
    letter = len(text) == 1 and text.upper() in LETTERS[: len(choices)]
    if answer_format == "letter" or (answer_format == "auto" and letter and text not in choices):
        if not letter:
            raise BadItem("answer_not_in_choices", f"answer {value!r} is not a letter of {len(choices)} choices")
        return LETTERS.index(text.upper())
    try:
        return answer_index(text, choices)
    except BadItem as e:
        if answer_format == "auto" and text.isdigit():  # an index, most likely
            raise BadItem(e.reason, f"{e.detail} (an index? set eval.fields.answer_format to index0 or "
                          "index1)") from None
        raise
