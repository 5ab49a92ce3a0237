"""Built-in dataset layouts, each a declaration (no per-dataset scripts)."""

from __future__ import annotations

from ralm.corpus.recipes.base import RawClip, Row, TableRecipe, register_recipe


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
        domain="domain",
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
