import json

import pytest

from ralm.corpus.recipes import RECIPES, BadRow, RawClip, TableRecipe, get_recipe, register_recipe
from tests import fixture_trees


def _scan(name, root, options=None):
    items = list(get_recipe(name).scan(str(root), options))
    return [i for i in items if isinstance(i, RawClip)], [i for i in items if isinstance(i, BadRow)]


def test_librispeech_layout(tmp_path):
    clips, bad = _scan("librispeech", fixture_trees.librispeech(tmp_path))
    assert len(clips) == 6 and len(bad) == 1 and bad[0].reason == "malformed_row"
    first = clips[0]
    assert first.domain == "speech" and first.transcript == "WORDS OF UTTERANCE NUMBER 0"
    assert first.metadata["speaker"] == "19" and first.rel_path == "19/198/19-198-0000.flac"
    assert first.audio_uri.endswith("19/198/19-198-0000.flac")


def test_esc50_layout(tmp_path):
    clips, bad = _scan("esc50", fixture_trees.esc50(tmp_path))
    assert [c.metadata["label"] for c in clips[:3]] == ["dog", "rain", "church bells"]
    assert all(c.domain == "sound" for c in clips) and len(clips) == 6
    assert len(bad) == 1 and "columns" in bad[0].detail


def test_captions_layout_and_domain_override(tmp_path):
    clips, bad = _scan("captions", fixture_trees.captions(tmp_path), {"domain": "music"})
    assert clips[0].caption == "A bird sings in a quiet park" and clips[0].domain == "music"
    assert len(bad) == 1


def test_manifest_layout_with_segments_and_split(tmp_path):
    clips, bad = _scan("manifest", fixture_trees.manifest(tmp_path))
    assert clips[0].transcript == "hello world" and clips[0].metadata == {"gender": "female", "transcript": "hello world"}
    assert clips[1].split == "test" and [s.speaker for s in clips[1].segments] == [1, 2]
    assert len(bad) == 1 and "JSON" in bad[0].detail


def test_missing_root_and_unknown_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(get_recipe("esc50").scan(str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        list(get_recipe("esc50").scan(str(tmp_path)))
    fixture_trees.esc50(tmp_path)
    with pytest.raises(ValueError, match="unknown options"):
        list(get_recipe("esc50").scan(str(tmp_path), {"colour": "red"}))


def test_registry_is_declarative_and_guarded():
    assert {"demo", "manifest", "librispeech", "esc50", "captions"} <= set(RECIPES)
    with pytest.raises(KeyError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(TableRecipe(name="esc50", manifest="x", reader="csv", audio="{a}", domain="d"))


def test_commonvoice_layout_split_from_file_gender_and_bare_quotes(tmp_path):
    clips, bad = _scan("commonvoice", fixture_trees.commonvoice(tmp_path))
    by_path = {c.rel_path: c for c in clips}
    assert sorted(by_path) == ["clips/bad.mp3", "clips/cv_0.mp3", "clips/cv_1.mp3", "clips/cv_2.mp3",
                               "clips/empty.mp3", "clips/zero.mp3"]
    first, dev, test = by_path["clips/cv_0.mp3"], by_path["clips/cv_1.mp3"], by_path["clips/cv_2.mp3"]
    assert (first.split, dev.split, test.split) == ("train", "valid", "test")  # dev.tsv is the valid split
    assert first.transcript == 'He said "yes 0.'  # a quote in a TSV is text
    assert first.metadata["gender"] == "male" and dev.metadata["gender"] == "female"
    assert "gender" not in test.metadata  # "do_not_wish_to_say" is no fact about the voice
    assert first.metadata["age"] == "twenties" and first.metadata["language"] == "en"
    assert first.domain == "speech"
    assert [b.where for b in bad] == ["train.tsv:6"] and "columns" in bad[0].detail


def test_table_recipe_declared_in_options_headerless_pipe_table(tmp_path):
    opts = {"manifest": "metadata.csv", "delimiter": "|", "columns": ["id", "text", "normalized"],
            "quotes": False, "audio": "wavs/{id}.wav", "transcript": "normalized", "domain": "speech",
            "metadata": {"utterance": "id"}}
    clips, bad = _scan("table", fixture_trees.ljspeech(tmp_path), opts)
    assert len(clips) == 5 and clips[0].transcript == '"Printing 0, in the only sense'
    assert clips[0].metadata["utterance"] == "LJ001-0000" and clips[0].audio_uri.endswith("wavs/LJ001-0000.wav")
    assert [b.where for b in bad] == ["metadata.csv:6"]  # headerless: the first line is row 1
    # The same file read with quoting on swallows the lines after an open quote: not what the user meant.
    quoted, _ = _scan("table", tmp_path, {**opts, "quotes": True})
    assert len(quoted) != 5


def test_table_recipe_columns_for_domain_split_and_caption_json_list(tmp_path):
    fixture_trees._tone(tmp_path / "a.wav")
    fixture_trees._tone(tmp_path / "b.wav", freq=300)
    rows = [{"file": "a.wav", "kind": "music", "part": "validation", "text": "a piano"},
            {"file": "b.wav", "kind": "sound", "part": "training", "text": "a door"},
            {"file": "b.wav", "kind": "noise", "part": "train", "text": "x"},  # not a domain
            {"file": "b.wav", "kind": "sound", "part": "holdout", "text": "x"}]  # not a split
    (tmp_path / "items.json").write_text(json.dumps(rows))  # one JSON list, not JSON lines
    opts = {"manifest": "items.json", "audio": "{file}", "domain_column": "kind", "split": "part",
            "caption": "text"}
    clips, bad = _scan("table", tmp_path, opts)
    assert [(c.domain, c.split, c.caption) for c in clips] == [("music", "valid", "a piano"), ("sound", "train", "a door")]
    assert [b.where for b in bad] == ["items.json:3", "items.json:4"]
    assert "'noise' is not one of" in bad[0].detail and "'holdout' is not one of" in bad[1].detail


def test_table_recipe_needs_its_mapping_and_says_which_part_is_missing(tmp_path):
    for opts, message in (({}, "options.manifest is required"),
                          ({"manifest": "m.csv"}, "options.audio is required"),
                          ({"manifest": "m.csv", "audio": "{f}"}, "options.domain"),
                          ({"manifest": "m.csv", "audio": "{f}", "domain": "speach"}, "'speach' is not one of"),
                          ({"manifest": "m.csv", "audio": "{f}", "domain": "speech", "reader": "xml"}, "reader 'xml'"),
                          ({"manifest": "m.csv", "audio": "{f}", "domain": "speech", "columns": "a,b"}, "wrong type")):
        with pytest.raises(ValueError, match=message):
            list(get_recipe("table").scan(str(tmp_path), opts))
    (tmp_path / "m.dat").write_text("\ufefff\na.wav\n", encoding="utf-8")  # a spreadsheet's byte-order mark
    with pytest.raises(ValueError, match="set options.reader"):
        list(get_recipe("table").scan(str(tmp_path), {"manifest": "m.dat", "audio": "{f}", "domain": "sound"}))
    clips, _ = _scan("table", tmp_path, {"manifest": "m.dat", "audio": "{f}", "domain": "sound", "reader": "csv"})
    assert [c.rel_path for c in clips] == ["a.wav"]


def test_folder_layout_split_label_and_sidecar_transcript(tmp_path):
    clips, bad = _scan("folder", fixture_trees.folder(tmp_path), {"domain": "sound"})
    by_path = {c.rel_path: c for c in clips}
    assert sorted(by_path) == ["note.wav", "test/rain/2.flac", "train/dog_bark/1.wav", "train/rain/bad.wav",
                               "train/rain/empty.wav", "train/rain/zero.wav"]  # README.md is not audio
    assert by_path["train/dog_bark/1.wav"].metadata == {"label": "dog bark"}
    assert by_path["train/dog_bark/1.wav"].split == "train" and by_path["test/rain/2.flac"].split == "test"
    note = by_path["note.wav"]
    assert note.transcript == "a spoken note" and note.split is None and "label" not in note.metadata
    assert not bad
    unlabelled, _ = _scan("folder", tmp_path, {"domain": "sound", "label": "none", "extensions": ["flac"]})
    assert [(c.rel_path, c.metadata) for c in unlabelled] == [("test/rain/2.flac", {})]
    by_name, _ = _scan("folder", tmp_path, {"domain": "sound", "label": "stem", "extensions": ["wav"]})
    assert {c.rel_path: c.metadata["label"] for c in by_name}["train/rain/empty.wav"] == "empty"
    with pytest.raises(ValueError, match="options.label must be one of"):
        list(get_recipe("folder").scan(str(tmp_path), {"domain": "sound", "label": "parent"}))
    with pytest.raises(ValueError, match="options.domain must be one of"):
        list(get_recipe("folder").scan(str(tmp_path)))


def test_config_checks_recipe_names_and_options_before_any_work():
    from ralm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"corpus.recipes.0: .*unknown recipe 'tabel'"):
        load_config("demo", ["corpus.recipes=[{name: tabel, root: /data}]"])
    with pytest.raises(ConfigError, match=r"corpus.recipes.0: .*options.audio is required"):
        load_config("demo", ["corpus.recipes=[{name: table, root: /data, options: {manifest: m.csv}}]"])
    with pytest.raises(ConfigError, match=r"corpus.recipes.0: .*needs a root folder"):
        load_config("demo", ["corpus.recipes=[{name: esc50}]"])
    cfg = load_config("demo", ["corpus.recipes=[{name: folder, root: /data, options: {domain: speech}}]"])
    assert cfg.corpus.recipes[0].options == {"domain": "speech"}


def test_table_rows_with_long_fields_are_read(tmp_path):
    """A transcript over the csv module's default 128 KiB field limit is a row like any other."""
    fixture_trees._tone(tmp_path / "a.wav")
    fixture_trees._tone(tmp_path / "b.wav", freq=300)
    long_text = "word " * 40_000  # ~200 KB
    (tmp_path / "m.csv").write_text(f"file,text\na.wav,{long_text}\nb.wav,short\n")
    clips, bad = _scan("table", tmp_path, {"manifest": "m.csv", "audio": "{file}", "domain": "speech",
                                          "transcript": "text"})
    assert not bad and [len(c.transcript) for c in clips] == [len(long_text.strip()), 5]
