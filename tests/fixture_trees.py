"""Small on-disk dataset layouts (LibriSpeech, ESC-50, captions CSV, ralm manifest) for recipe tests,
each with a corrupt file, an empty file, an all-zero file and a malformed manifest row planted in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def _tone(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0, zero: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    wav = np.zeros_like(t) if zero else 0.3 * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), wav.astype(np.float32), sr, format="FLAC" if path.suffix == ".flac" else None)


def _plant_bad(path_corrupt: Path, path_empty: Path, path_zero: Path) -> None:
    path_corrupt.parent.mkdir(parents=True, exist_ok=True)
    path_corrupt.write_bytes(b"fLaC\x00\x00\x00\x22" + b"\x13\x37" * 300)
    path_empty.write_bytes(b"")
    _tone(path_zero, zero=True)


def librispeech(root: Path) -> Path:
    chapter = root / "19" / "198"
    for i, f in enumerate((300, 500, 700)):
        _tone(chapter / f"19-198-000{i}.flac", seconds=1 + i * 0.5, freq=f)
    _plant_bad(chapter / "19-198-0003.flac", chapter / "19-198-0004.flac", chapter / "19-198-0005.flac")
    lines = [f"19-198-000{i} WORDS OF UTTERANCE NUMBER {i}" for i in range(6)] + ["19-198-0099"]  # malformed
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def esc50(root: Path) -> Path:
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i, cat in enumerate(("dog", "rain", "church_bells")):
        _tone(root / "audio" / f"1-{i}-A-{i}.wav", seconds=2, freq=200 + 100 * i)
        rows.append(f"1-{i}-A-{i}.wav,1,{i},{cat},False,{i},A")
    _plant_bad(root / "audio" / "bad.wav", root / "audio" / "empty.wav", root / "audio" / "zero.wav")
    rows += ["bad.wav,1,9,crackling_fire,False,9,A", "empty.wav,1,9,wind,False,9,A", "zero.wav,1,9,snoring,False,9,A",
             "broken.wav,1,9"]  # malformed: too few columns
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def captions(root: Path) -> Path:
    rows = ["file_name,caption_1,caption_2"]
    for i, cap in enumerate(("A bird sings in a quiet park", "Cars pass on a wet road")):
        _tone(root / "audio" / f"clip{i}.wav", seconds=1.5, freq=600 + 200 * i)
        rows.append(f"clip{i}.wav,{cap},other caption")
    _plant_bad(root / "audio" / "bad.wav", root / "audio" / "empty.wav", root / "audio" / "zero.wav")
    rows += ["bad.wav,Something,x", "empty.wav,Nothing,x", "zero.wav,Silence,x", '"unterminated,quote']
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def manifest(root: Path) -> Path:
    _tone(root / "a.wav", seconds=1.2)
    _tone(root / "b.wav", seconds=2.0, freq=250)
    _plant_bad(root / "bad.wav", root / "empty.wav", root / "zero.wav")
    rows = [
        {"audio": "a.wav", "domain": "speech", "transcript": "hello world", "metadata": {"gender": "female"}},
        {"audio": "b.wav", "domain": "speech", "split": "test", "segments": [
            {"start": 0, "end": 1, "text": "Hi.", "speaker": 1}, {"start": 1, "end": 2, "text": "Hey.", "speaker": 2}]},
        {"audio": "bad.wav", "domain": "sound"},
        {"audio": "empty.wav", "domain": "sound"},
        {"audio": "zero.wav", "domain": "sound"},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"audio": "a.wav", "domain": \n'
    (root / "manifest.jsonl").write_text(text)
    return root


def commonvoice(root: Path) -> Path:
    """One Common Voice language folder: {train,dev,test}.tsv + clips/*.mp3; a sentence with a bare quote."""
    head = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale"
    rows = {"train": [], "dev": [], "test": []}
    for i, (split, gender) in enumerate((("train", "male_masculine"), ("dev", "female_feminine"),
                                         ("test", "do_not_wish_to_say"))):
        _tone(root / "clips" / f"cv_{i}.mp3", seconds=1.5, freq=180 + 60 * i)
        rows[split].append(f"c{i}\tcv_{i}.mp3\tHe said \"yes {i}.\tyes\t0\ttwenties\t{gender}\tIndia\ten")
    _plant_bad(root / "clips" / "bad.mp3", root / "clips" / "empty.mp3", root / "clips" / "zero.mp3")
    rows["train"] += [f"x\t{n}.mp3\tSomething.\t1\t0\t\t\t\ten" for n in ("bad", "empty", "zero")]
    rows["train"].append("y\tshort.mp3\tToo few columns")  # malformed
    for split, lines in rows.items():
        (root / f"{split}.tsv").write_text("\n".join([head, *lines]) + "\n")
    return root


def ljspeech(root: Path) -> Path:
    """LJSpeech-like: a headerless `id|text|normalized text` metadata.csv (a text with a bare quote) + wavs/."""
    lines = []
    for i in range(2):
        _tone(root / "wavs" / f"LJ001-000{i}.wav", seconds=1.0 + i, freq=300 + 100 * i)
        lines.append(f'LJ001-000{i}|"Printing {i}, in the only sense|"Printing {i}, in the only sense')
    _plant_bad(root / "wavs" / "bad.wav", root / "wavs" / "empty.wav", root / "wavs" / "zero.wav")
    lines += [f"{n}|Text.|Text." for n in ("bad", "empty", "zero")] + ["LJ009-0001|only two fields"]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def folder(root: Path) -> Path:
    """Audio in folders, no manifest: split folders, label folders, a transcript beside one clip."""
    _tone(root / "train" / "dog_bark" / "1.wav", seconds=1.0, freq=300)
    _tone(root / "test" / "rain" / "2.flac", seconds=1.5, freq=500)
    _tone(root / "note.wav", seconds=1.2, freq=700)
    (root / "note.txt").write_text("  a spoken\nnote  \n")
    (root / "README.md").write_text("not audio")
    _plant_bad(root / "train" / "rain" / "bad.wav", root / "train" / "rain" / "empty.wav",
               root / "train" / "rain" / "zero.wav")
    return root
