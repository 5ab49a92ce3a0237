"""Built-in dataset layouts, each a declaration (no per-dataset scripts)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from ralm import storage
from ralm.corpus.recipes.base import (
    SPLIT_ALIASES,
    BadRow,
    RawClip,
    Row,
    TableRecipe,
    checked_options,
    recipe_root,
    register_recipe,
)
from ralm.records import DOMAINS


def _first(*columns: str):  # type: ignore[no-untyped-def]
    def get(row: Row) -> str | None:
        return next((row[c] for c in columns if row.get(c)), None)

    return get


# ralm's own manifest (also what the demo writes): one JSON object per line, see docs in README.
MANIFEST = register_recipe(
    TableRecipe(
        name="manifest",
        manifest="manifest.jsonl",
        reader="jsonl",
        audio="{audio}",
        domain=None,
        domain_column="domain",
        transcript="transcript",
        caption="caption",
        segments="segments",
        split="split",
        metadata_column="metadata",
    )
)

# LibriSpeech: <root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt with `<utt-id> <TEXT>` lines.
LIBRISPEECH = register_recipe(
    TableRecipe(
        name="librispeech",
        manifest="**/*.trans.txt",
        reader="id_text",
        audio="{id}.flac",
        domain=lambda row: "speech",
        transcript="text",
        metadata={"speaker": lambda row: row["id"].split("-")[0], "language": lambda row: "english"},
    )
)

# ESC-50: <root>/meta/esc50.csv (filename,fold,target,category,esc10,src_file,take), audio in <root>/audio/.
ESC50 = register_recipe(
    TableRecipe(
        name="esc50",
        manifest="meta/esc50.csv",
        reader="csv",
        audio="audio/{filename}",
        audio_base="root",
        domain=lambda row: "sound",
        metadata={"label": lambda row: row["category"].replace("_", " ")},
    )
)

# AudioCaps / Clotho style captions CSV: a file column and one or more caption columns.
# Clotho: file_name, caption_1..caption_5; AudioCaps: audiocap_id, youtube_id, start_time, caption
# (point `audio` at your file naming, e.g. options: {audio: "audio/{youtube_id}.wav"}).
CAPTIONS = register_recipe(
    TableRecipe(
        name="captions",
        manifest="*.csv",
        reader="csv",
        audio="audio/{file_name}",
        audio_base="root",
        domain=lambda row: "sound",
        caption=_first("caption", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"),
    )
)


# Any table, declared in the config: `options` name the manifest, the audio path and the columns (see README).
TABLE = register_recipe(TableRecipe(name="table", manifest=None, reader=None, audio=None, domain=None))


def _commonvoice_gender(row: Row) -> str | None:
    """Common Voice spells it male / female (before v17) or male_masculine / female_feminine; other answers
    (including 'do_not_wish_to_say') are no fact about the voice."""
    value = (row.get("gender") or "").split("_")[0]
    return value if value in ("male", "female") else None


# Common Voice: <root> = one language folder, {train,dev,test}.tsv (client_id, path, sentence, ..., age, gender,
# accents, locale) and clips/*.mp3; the file is the split.
COMMONVOICE = register_recipe(
    TableRecipe(
        name="commonvoice",
        manifest=("train.tsv", "dev.tsv", "test.tsv"),
        reader="tsv",
        audio="clips/{path}",
        domain=lambda row: "speech",
        transcript="sentence",
        split_from_file=True,
        metadata={"gender": _commonvoice_gender, "age": "age", "accent": _first("accents", "accent"),
                  "language": "locale"},
    )
)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".mka", ".aiff",
                    ".aif", ".au", ".snd", ".caf", ".w64", ".wv", ".amr")


class FolderRecipe:
    """Audio files in a folder tree, no manifest. A folder named like a split (train, dev, validation, test...)
    gives the split; the innermost other folder gives `metadata.label` (`<root>/dog/1.wav` -> label "dog"),
    or with `label: stem` the file's name (`<root>/stereo/door-bell.oga` -> "door bell"), `label: none` no label;
    a `.txt` or `.lab` file beside a clip with the same name is its transcript.
    Options: `domain` (required: one of DOMAINS), `extensions`, `label` (folder, stem or none)."""

    name = "folder"
    OPTIONS = {"domain": str, "extensions": list, "label": str}
    LABELS = ("folder", "stem", "none")

    def configured(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        opts = checked_options(self.name, options, self.OPTIONS)
        if opts.get("domain") not in DOMAINS:
            raise ValueError(f"recipe folder: options.domain must be one of {DOMAINS} (got {opts.get('domain')!r})")
        exts = opts.get("extensions", AUDIO_EXTENSIONS)
        if not all(isinstance(e, str) for e in exts):
            raise ValueError(f"recipe folder: option extensions = {exts!r} has the wrong type")
        label = opts.get("label", "folder")
        if label not in self.LABELS:
            raise ValueError(f"recipe folder: options.label must be one of {self.LABELS} (got {label!r})")
        return {"domain": opts["domain"], "label": label,
                "extensions": tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts)}

    def scan(self, root: str, options: Mapping[str, Any] | None = None) -> Iterator[RawClip | BadRow]:
        opts = self.configured(options)
        root = recipe_root(self.name, root)
        for folder, files in storage.walk(root):
            present = set(files)
            for name in files:
                stem, ext = os.path.splitext(name)
                if name.startswith(".") or ext.lower() not in opts["extensions"]:
                    continue
                path = storage.join(folder, name)
                rel = storage.relative(path, root)
                folders = rel.split("/")[:-1]
                splits = [SPLIT_ALIASES[f.lower()] for f in folders if f.lower() in SPLIT_ALIASES]
                labels = [f for f in folders if f.lower() not in SPLIT_ALIASES]
                label = {"folder": labels[-1] if labels else None, "stem": stem, "none": None}[opts["label"]]
                metadata = {"label": " ".join(label.replace("_", " ").replace("-", " ").split())} if label else {}
                sidecar = next((stem + e for e in (".txt", ".lab") if stem + e in present), None)
                transcript = _sidecar_text(storage.join(folder, sidecar)) if sidecar else None
                if transcript:
                    metadata["transcript"] = transcript
                yield RawClip(source=self.name, rel_path=rel, audio_uri=path, domain=opts["domain"],
                              transcript=transcript, metadata=metadata, split=splits[-1] if splits else None)


def _sidecar_text(uri: str) -> str | None:
    return " ".join(storage.read_bytes(uri).decode("utf-8", errors="replace").split()) or None


register_recipe(FolderRecipe())  # type: ignore[arg-type]


class DemoRecipe:
    """The embedded demo: synthesizes its clips offline (ralm.corpus.demo), then reads them as a manifest."""

    name = "demo"

    def scan(self, root: str, options=None):  # type: ignore[no-untyped-def]
        from ralm.corpus.demo import synthesize_demo

        opts = dict(options or {})
        manifest = synthesize_demo(root, seed=int(opts.pop("seed", 0)), scale=int(opts.pop("scale", 1)))
        # Domains interleaved (speech, sound, music, instruction, speech, ...): a recipe `limit` then keeps
        # a mix of every kind of clip instead of the first N speech clips. A few hundred rows: held in memory.
        by_domain: dict[str, list[RawClip]] = {}
        for item in MANIFEST.scan(manifest.rsplit("/", 1)[0], opts):
            if not isinstance(item, RawClip):  # a bad manifest row: reported as it comes
                yield item
                continue
            item.source = self.name
            by_domain.setdefault(item.domain or "", []).append(item)
        queues = list(by_domain.values())
        for i in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if i < len(q):
                    yield q[i]


register_recipe(DemoRecipe())  # type: ignore[arg-type]
