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
