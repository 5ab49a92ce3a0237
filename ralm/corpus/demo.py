"""The demo corpus, synthesized fully offline from Debian packages (espeak-ng, flite, fluidsynth + TimGM6mb,
sox for decoding/resampling; noise, tones and sweeps in numpy) and real labelled recordings (asterisk prompts, LibriVox/CMU test utterances, ALSA
channel names, freedesktop/Yaru event sounds, sonic-pi samples).

`synthesize_demo(out_dir)` writes 16 kHz mono wavs under `out_dir/<domain>/` and `out_dir/manifest.jsonl`
in the demo-corpus contract (one JSON object per clip: audio, domain, transcript, caption, segments, split,
metadata with ORIGINAL facts only, all values strings). It is

- declarative: *planners* (one per source, in a registry) turn the seed into a list of `Clip`s with every
  fact decided up front; *renderers* (a registry keyed by `Clip.kind`) turn one clip's params into audio;
- deterministic: the plan depends only on (seed, scale, which optional sources are installed); renders
  depend only on the clip's params, so the manifest (order and content) and the audio are reproducible;
- idempotent: a finished build leaves `out_dir/.demo-version`; a call with the same version/seed/scale
  returns at once;
- fast: renders run in a small thread pool (the work is in espeak-ng/flite/fluidsynth/sox subprocesses).

Learnable facts are made balanced and clearly audible: beep counts 1-5 with 0.25-0.35 s gaps, pitch
registers two octaves apart, noise colours in equal numbers, male/female voices in similar numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

DEMO_VERSION = "1"
SAMPLE_RATE = 16000
MIN_SECONDS = 1.0  # shorter clips are padded with trailing silence
MAX_SECONDS = 6.0  # longer recordings without a transcript are cut (with a fade); with one, skipped
DOMAINS = ("speech", "sound", "music", "instruction")
MIN_PER_DOMAIN = 60
TEST_EVERY = 6  # one clip in 6 (16.7%) of every domain is held out, stratified by its main fact
STAMP = ".demo-version"
MANIFEST = "manifest.jsonl"

# ------------------------------------------------------------------------------------------ system assets
SETUP_HINT = "install it with scripts/setup.sh (it installs every Debian package the demo needs)"
REQUIRED_TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite", "sox": "sox", "fluidsynth": "fluidsynth"}
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/default-GM.sf2")

# Optional real recordings: name -> (Debian package, path that must exist).
SOURCES: dict[str, tuple[str, str]] = {
    "asterisk": ("asterisk-core-sounds-en-wav", "/usr/share/asterisk/sounds/en_US_f_Allison"),
    "asterisk_text": ("asterisk-core-sounds-en", "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"),
    "pocketsphinx": ("pocketsphinx-testdata", "/usr/share/pocketsphinx/test/data"),
    "alsa": ("alsa-utils", "/usr/share/sounds/alsa"),
    "freedesktop": ("sound-theme-freedesktop", "/usr/share/sounds/freedesktop/stereo"),
    "yaru": ("yaru-theme-sound", "/usr/share/sounds/Yaru/stereo"),
    "sonic_pi": ("sonic-pi-samples", "/usr/share/sonic-pi/samples"),
}


class DemoAssetsError(RuntimeError):
    """A Debian package the demo cannot do without is missing."""


def find_soundfont() -> str | None:
    env = os.environ.get("RALM_DEMO_SOUNDFONT")
    for path in ((env,) if env else ()) + SOUNDFONTS:
        if path and os.path.isfile(path):
            return path
    return None


def check_tools() -> str:
    """Raise DemoAssetsError naming each missing package; return the soundfont path."""
    missing = [pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    sf2 = find_soundfont()
    if sf2 is None:
        missing.append("timgm6mb-soundfont")
    if missing:
        raise DemoAssetsError(f"the demo corpus needs the Debian package(s) {', '.join(missing)}: {SETUP_HINT}")
    return sf2


def available_sources() -> dict[str, str]:
    """Installed optional sources (name -> path); a warning for each missing one."""
    found: dict[str, str] = {}
    for name, (pkg, path) in SOURCES.items():
        if os.path.exists(path):
            found[name] = path
        else:
            warnings.warn(f"demo corpus: optional package {pkg} is missing ({path}); skipping its clips "
                          f"({SETUP_HINT})", stacklevel=3)
    return found


# ------------------------------------------------------------------------------------------ the demo's words
# Written for ralm. Sentences are short (6-11 words) so even the slow rate stays under ~6 s, and use no
# digits or abbreviations (the synthesizers would expand them and the transcript would no longer be exact).
SENTENCES: tuple[str, ...] = (
    "The little boat drifted slowly across the quiet lake.",
    "Please remember to water the tomatoes before dinner.",
    "My grandmother keeps a jar of buttons in her kitchen.",
    "The train to the coast leaves early tomorrow morning.",
    "A gentle breeze carried the smell of fresh bread.",
    "We found a tiny frog hiding under the garden hose.",
    "The library closes at noon on public holidays.",
    "Her violin lesson was moved to Thursday afternoon.",
    "The mountain road was covered in thick morning fog.",
    "Could you pass me the blue notebook on the shelf?",
    "The children built a sandcastle with a deep moat.",
    "Our neighbour painted his fence a bright yellow.",
    "The old clock in the hallway stopped at midnight.",
    "A flock of geese flew south over the wheat fields.",
    "The coffee machine on the third floor is broken again.",
    "She wrapped the birthday present in silver paper.",
    "The museum has a whale skeleton hanging from the ceiling.",
    "Thunder rolled across the valley long after the lightning.",
    "He forgot his umbrella and walked home in the rain.",
    "The bakery sells warm cinnamon rolls every Saturday.",
    "Turn left at the pharmacy and the station is ahead.",
    "The kitten chased a ribbon around the living room.",
    "Fresh snow covered the rooftops of the sleeping village.",
    "The pilot announced a short delay because of strong winds.",
    "Lemons and honey make a soothing drink for a sore throat.",
    "The concert hall was silent before the orchestra began.",
    "A squirrel buried acorns beneath the old oak tree.",
    "The bridge over the river was closed for repairs.",
    "Grandpa told us stories about sailing ships and pirates.",
    "The soup needs a little more salt and pepper.",
    "Bright lanterns floated on the water during the festival.",
    "The teacher wrote a difficult puzzle on the blackboard.",
    "Our flight landed safely despite the stormy weather.",
    "The farmer drove his tractor through the muddy field.",
    "A red kite danced high above the sandy beach.",
    "The doctor said the cast can come off next week.",
    "We watched the sunset from the top of the hill.",
    "The bicycle chain slipped while I was climbing the hill.",
    "Tiny bubbles rose slowly to the surface of the pond.",
    "The market was crowded with people buying fresh fish.",
    "My brother collects stamps from faraway islands.",
    "The candle flickered as the window rattled in the wind.",
    "A warm blanket and a good book make a perfect evening.",
    "The astronaut waved at the camera from the space station.",
    "Somebody left a pair of gloves on the bus seat.",
    "The garden gate squeaks every time it opens.",
    "The chef sliced the onions with remarkable speed.",
    "Owls hunt quietly through the forest at night.",
    "The parcel arrived two days earlier than expected.",
    "The river sparkled under the bright summer sun.",
    "Please close the door quietly when you leave.",
    "The orchestra tuned their instruments before the show.",
    "A lighthouse guided the fishing boats back to the harbour.",
    "The painter mixed green and white to make a pale mint.",
    "Our team won the match in the final minute.",
    "The baby giggled when the puppy licked her toes.",
    "Strong coffee helps me wake up on cold mornings.",
    "The desert gets surprisingly cold after the sun goes down.",
    "He planted sunflowers along the edge of the path.",
    "The wooden staircase creaked under the heavy boxes.",
    "A rainbow appeared just as the shower ended.",
    "The scientist measured the temperature of the ice carefully.",
    "Bees buzzed lazily around the lavender bushes.",
    "The waiter brought us two bowls of tomato soup.",
)

# Two-speaker exchanges (speaker 1 then speaker 2), short enough for ~6 s together.
DIALOGUES: tuple[tuple[str, str], ...] = (
    ("Is the kettle on?", "Yes, the tea is almost ready."),
    ("Where did you park the car?", "Right behind the old church."),
    ("Have you seen my keys?", "They are on the kitchen table."),
    ("What time does the film start?", "It starts at seven tonight."),
    ("Shall we walk to the park?", "Sure, let me grab my jacket."),
    ("Did you feed the cat?", "Yes, she already had her breakfast."),
    ("Is it going to rain today?", "The forecast says only clouds."),
    ("Can you help me carry this box?", "Of course, it looks heavy."),
    ("Who won the chess game?", "My sister won in twenty moves."),
    ("Are the shops open on Sunday?", "Only the small ones near the square."),
)

_NUM_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()


def number_word(n: int) -> str:
    if 0 <= n <= 20:
        return _NUM_WORDS[n]
    tens = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
    if 20 < n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + _NUM_WORDS[n % 10])
    raise ValueError(f"number_word supports 0..99, got {n}")


# (question, answer or None). Answers are objectively known; numbers are written as digits so the
# verifier and the MCQ builder can compare them numerically.
FACT_QUESTIONS: tuple[tuple[str, str | None], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Egypt?", "Cairo"),
    ("How many days are there in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("How many months are there in a year?", "12"),
    ("How many sides does a triangle have?", "3"),
    ("How many minutes are there in an hour?", "60"),
    ("What day comes after Monday?", "Tuesday"),
    ("What day comes before Sunday?", "Saturday"),
    ("Which month comes after March?", "April"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of early?", "late"),
    ("What colour is a ripe banana?", "yellow"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour is fresh snow?", "white"),
    ("Which animal says moo?", "cow"),
    ("Which planet do we live on?", "Earth"),
    ("What is the first letter of the alphabet?", "A"),
    ("What is the last letter of the alphabet?", "Z"),
    ("What is the first letter of the word banana?", "B"),
    ("Which is larger, an elephant or a mouse?", "elephant"),
    ("Is ice hot or cold?", "cold"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Name a colour of the sky on a clear day.", "blue"),
    ("What season comes after winter?", "spring"),
)

OPEN_INSTRUCTIONS: tuple[str, ...] = (
    "Tell me a fun fact about the moon.",
    "Suggest a name for a pet goldfish.",
    "Describe a sunny beach in one sentence.",
    "Give me a tip for sleeping better.",
    "Name something you would pack for a picnic.",
    "Tell me a short joke about a penguin.",
    "Describe the taste of a lemon.",
    "Suggest a game to play on a rainy day.",
    "Tell me why people enjoy gardening.",
    "Give me one idea for a healthy breakfast.",
)


def instruction_items(rng: random.Random, n: int) -> list[tuple[str, str | None, str]]:
    """n spoken tasks as (text, answer, kind): arithmetic, counting, facts and open instructions, in a
    fixed mix (40% arithmetic, 10% counting, 35% facts, 15% open) so every kind is represented."""
    facts = list(FACT_QUESTIONS)
    opens = list(OPEN_INSTRUCTIONS)
    rng.shuffle(facts)
    rng.shuffle(opens)
    kinds = ["arithmetic"] * 8 + ["count"] * 2 + ["fact"] * 7 + ["open"] * 3
    out: list[tuple[str, str | None, str]] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "arithmetic":
            op = rng.choice(("plus", "minus", "times"))
            if op == "plus":
                a, b = rng.randint(1, 12), rng.randint(1, 12)
                ans = a + b
            elif op == "minus":
                a = rng.randint(5, 20)
                b = rng.randint(1, a - 1)
                ans = a - b
            else:
                a, b = rng.randint(2, 9), rng.randint(2, 9)
                ans = a * b
            form = rng.choice(("What is {a} {op} {b}?", "How much is {a} {op} {b}?",
                               "Can you tell me what {a} {op} {b} is?"))
            text, answer = form.format(a=number_word(a), op=op, b=number_word(b)), str(ans)
        elif kind == "count":
            start = rng.randint(1, 3)
            end = start + rng.randint(2, 4)
            if rng.random() < 0.5:
                text = f"Count from {number_word(start)} to {number_word(end)}."
                answer = ", ".join(number_word(k) for k in range(start, end + 1))
            else:
                text = f"Count backwards from {number_word(end)} to {number_word(start)}."
                answer = ", ".join(number_word(k) for k in range(end, start - 1, -1))
        elif kind == "fact":
            if not facts:
                continue
            text, answer = facts.pop(0)
        else:
            if not opens:
                continue
            text, answer = opens.pop(0), None
        if text in seen:
            continue
        seen.add(text)
        out.append((text, answer, kind))
        if i > 50 * n + 100:  # pools exhausted (huge n): stop rather than loop forever
            break
    return out


# ------------------------------------------------------------------------------------------ voices and facts
# (voice, gender). Variants checked here: female variants speak at a median F0 of 178-208 Hz, male ones
# at 92-106 Hz. (Not `en-gb+fN`: that voice ignores the variant and stays male.)
ESPEAK_VOICES: tuple[tuple[str, str], ...] = (
    ("en-us+m3", "male"), ("en-us+f3", "female"), ("en-us+m1", "male"), ("en-us+f1", "female"),
    ("en-gb-x-rp+m5", "male"), ("en-gb-x-rp+f2", "female"), ("en-gb-scotland+m4", "male"),
    ("en-gb-scotland+f3", "female"), ("en-us+m7", "male"), ("en-us+f4", "female"),
    ("en-029+m2", "male"), ("en-029+f4", "female"),
)
FLITE_VOICES: tuple[tuple[str, str], ...] = (("slt", "female"), ("rms", "male"), ("awb", "male"), ("kal", "male"))
RATES = ("normal", "slow", "fast")
ESPEAK_WPM = {"slow": 125, "normal": 165, "fast": 215}
FLITE_STRETCH = {"slow": 1.3, "normal": 1.0, "fast": 0.78}
NOISE_COLOURS = ("white", "pink", "brown")
# Registers two octaves apart so "low / middle / high" is unambiguous.
REGISTER_HZ = {"low": (196.0, 220.0, 262.0), "middle": (523.0, 659.0, 784.0), "high": (1760.0, 2093.0, 2637.0)}
REGISTERS = ("low", "middle", "high")
SNRS_DB = (5, 10, 15, 20)
# GM programs rendered with TimGM6mb (name as a listener would say it).
INSTRUMENTS: tuple[tuple[str, int], ...] = (
    ("piano", 0), ("acoustic guitar", 24), ("violin", 40), ("cello", 42), ("flute", 73), ("trumpet", 56),
    ("church organ", 19), ("clarinet", 71), ("harp", 46), ("xylophone", 13),
)
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11, 12), "minor": (0, 2, 3, 5, 7, 8, 10, 12)}
TEMPO_BPM = {"slow": (60, 66, 72), "moderate": (92, 100, 108), "fast": (132, 144, 160)}
# Tonic MIDI note window per register: low 31-42, middle 55-66, high 79-90; melodies span one octave up,
# so the registers never overlap.
REGISTER_BASE_MIDI = {"low": 36, "middle": 60, "high": 84}

# freedesktop / Yaru event sounds: file stem -> plain-words label (stems not listed are skipped: too short
# to hear, spoken words, or test signals).
EVENT_LABELS = {
    "alarm-clock-elapsed": "alarm clock", "bell": "bell", "camera-shutter": "camera shutter",
    "screen-capture": "camera shutter", "complete": "completion chime", "device-added": "device connected chime",
    "device-removed": "device disconnected chime", "dialog-error": "error alert", "dialog-warning": "warning alert",
    "dialog-question": "question alert", "window-question": "question alert", "window-attention": "attention alert",
    "message": "message alert", "message-new-instant": "instant message alert", "message-new-email": "new email alert",
    "network-connectivity-established": "network connected chime",
    "network-connectivity-lost": "network disconnected chime", "phone-incoming-call": "phone ringing",
    "phone-outgoing-busy": "busy signal", "phone-outgoing-calling": "phone ringback tone",
    "power-plug": "power plugged in chime", "power-unplug": "power unplugged chime",
    "service-login": "login chime", "service-logout": "logout chime", "desktop-login": "login chime",
    "desktop-logoff": "logout chime", "system-ready": "startup chime", "suspend-error": "error alert",
    "trash-empty": "trash emptying", "battery-low": "low battery alert",
}
ALSA_CHANNELS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
                 "Side_Left", "Side_Right")

# sonic-pi samples: prefix -> (domain, category, how many at scale 1). Labels come from the name.
SONIC_PI_GROUPS: dict[str, tuple[str, str, int]] = {
    "ambi": ("sound", "ambient", 5), "vinyl": ("sound", "vinyl", 3), "perc": ("sound", "percussion", 4),
    "misc": ("sound", "misc", 2), "mehackit": ("sound", "electronic", 2), "glitch": ("sound", "glitch", 1),
    "loop": ("music", "loop", 12), "bass": ("music", "bass", 5), "guit": ("music", "guitar", 4),
    "tabla": ("music", "tabla", 2), "drum": ("music", "drum kit", 2), "elec": ("music", "electronic drum", 0),
}
SONIC_PI_LABELS = {
    "ambi_dark_woosh": "dark whoosh", "ambi_swoosh": "swoosh", "perc_till": "cash register",
    "perc_snap": "finger snap", "perc_snap2": "finger snap", "perc_swash": "cymbal swash",
    "misc_cineboom": "cinematic boom", "perc_door": "door", "loop_3d_printer": "3d printer",
    "ambi_lunar_land": "lunar landing", "ambi_sauna": "sauna ambience",
}
DRUM_LOOPS = {"loop_amen", "loop_amen_full", "loop_breakbeat", "loop_compus", "loop_industrial",
              "loop_mehackit1", "loop_mehackit2", "loop_perc1", "loop_perc2", "loop_safari", "loop_tabla"}
# loop_3d_printer is a machine noise, not music (planned as a sound below); ambi_piano is music, not a sound.
SONIC_PI_SKIP = {"loop_3d_printer", "ambi_piano"}


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Clip:
    """One planned clip: every fact decided before any audio exists."""

    domain: str
    source: str  # file-name stem of its wav: <domain>/<source>-NNNN.wav
    kind: str  # renderer name
    params: dict[str, Any]
    metadata: dict[str, str]
    transcript: str | None = None
    caption: str | None = None
    strat: str = ""  # stratum for the held-out split (its main fact)
    audio: str = ""
    split: str | None = None
    segments: list[dict[str, Any]] | None = None

    def row(self) -> dict[str, Any]:
        return {"audio": self.audio, "domain": self.domain, "transcript": self.transcript,
                "caption": self.caption, "segments": self.segments, "split": self.split,
                "metadata": {k: str(v) for k, v in self.metadata.items()}}


@dataclass
class PlanContext:
    seed: int
    scale: int
    sources: dict[str, str]
    rng: random.Random
    _sentences: list[str] = field(default_factory=list)

    def sentence(self) -> str:
        """Next sentence from a seeded shuffle of the pool (distinct until the pool is used up)."""
        if not self._sentences:
            pool = list(SENTENCES)
            self.rng.shuffle(pool)
            self._sentences = pool
        return self._sentences.pop()


Planner = Callable[[PlanContext], list[Clip]]
PLANNERS: dict[str, Planner] = {}
FILLERS: dict[str, Callable[[PlanContext, int], list[Clip]]] = {}


def register_planner(name: str) -> Callable[[Planner], Planner]:
    def deco(fn: Planner) -> Planner:
        PLANNERS[name] = fn
        return fn

    return deco


def register_filler(domain: str):  # type: ignore[no-untyped-def]
    """A synthetic source that tops a domain up when optional recordings are missing."""
    def deco(fn):  # type: ignore[no-untyped-def]
        FILLERS[domain] = fn
        return fn

    return deco


def _tts_meta(synth: str, voice: str, gender: str, rate: str) -> dict[str, str]:
    return {"gender": gender, "voice": voice, "synthesizer": "espeak-ng" if synth == "espeak" else "flite",
            "speaking_rate": rate, "language": "english"}


def _espeak_voice(i: int, male_share: float = 0.5) -> tuple[str, str]:
    """Voice i of a sequence with about `male_share` male voices, cycling through each gender's voices."""
    males = [v for v in ESPEAK_VOICES if v[1] == "male"]
    females = [v for v in ESPEAK_VOICES if v[1] == "female"]
    n_male_before = math.floor(i * male_share + 1e-9)
    is_male = math.floor((i + 1) * male_share + 1e-9) > n_male_before
    return males[n_male_before % len(males)] if is_male else females[(i - n_male_before) % len(females)]


def _tts_clip(ctx: PlanContext, domain: str, source: str, synth: str, voice: str, gender: str, rate: str,
              text: str, strat: str, extra: dict[str, str] | None = None) -> Clip:
    params = {"synth": synth, "voice": voice, "rate": rate, "text": text,
              "peak": round(ctx.rng.uniform(0.5, 0.9), 3)}
    meta = _tts_meta(synth, voice, gender, rate) | (extra or {})
    return Clip(domain, source, "tts", params, meta, transcript=text, strat=strat)


@register_planner("espeak")
def _plan_espeak(ctx: PlanContext, n: int | None = None) -> list[Clip]:
    n = 34 * ctx.scale if n is None else n
    out = []
    for i in range(n):
        voice, gender = _espeak_voice(i, male_share=0.6)  # asterisk adds female prompts
        out.append(_tts_clip(ctx, "speech", "espeak", "espeak", voice, gender, RATES[i % 3], ctx.sentence(),
                             f"espeak:{gender}"))
    return out


register_filler("speech")(_plan_espeak)


@register_planner("flite")
def _plan_flite(ctx: PlanContext) -> list[Clip]:
    out = []
    for i in range(16 * ctx.scale):
        voice, gender = FLITE_VOICES[i % len(FLITE_VOICES)]
        out.append(_tts_clip(ctx, "speech", "flite", "flite", voice, gender, RATES[(i // 4) % 3], ctx.sentence(),
                             f"flite:{gender}"))
    return out


def _asterisk_transcripts(path: str) -> dict[str, str]:
    import gzip

    out = {}
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if ":" in line and not line.startswith(";"):
                name, text = line.split(":", 1)
                out[name.strip()] = " ".join(text.split())
    return out


def _duration(path: str) -> float:
    info = sf.info(path)
    return info.frames / info.samplerate


@register_planner("asterisk")
def _plan_asterisk(ctx: PlanContext) -> list[Clip]:
    if "asterisk" not in ctx.sources or "asterisk_text" not in ctx.sources:
        return []
    root = ctx.sources["asterisk"]
    texts = _asterisk_transcripts(ctx.sources["asterisk_text"])
    meta = {"gender": "female", "voice": "Allison (asterisk prompts)", "synthesizer": "recording",
            "language": "english"}
    # Whole prompts only (never cut a word): 3-14 words, 1-6 s, no bracketed non-speech, no digits.
    prompts = []
    for name in sorted(texts):
        text = texts[name]
        wav = os.path.join(root, name + ".wav")
        if "/" in name or "[" in text or any(c.isdigit() for c in text) or not 3 <= len(text.split()) <= 14:
            continue
        if os.path.isfile(wav) and MIN_SECONDS <= _duration(wav) <= MAX_SECONDS:
            prompts.append((name, text))
    out = []
    for name, text in ctx.rng.sample(prompts, min(len(prompts), 12 * ctx.scale)):
        out.append(Clip("speech", "asterisk", "file", {"path": os.path.join(root, name + ".wav")}, dict(meta),
                        transcript=text, strat="recording:female"))
    # Digit strings spliced from the single-digit prompts: exact words, same (female) speaker.
    digits = [d for d in range(10) if os.path.isfile(os.path.join(root, "digits", f"{d}.wav"))]
    if len(digits) == 10:
        for _ in range(4 * ctx.scale):
            seq = [ctx.rng.randrange(10) for _ in range(ctx.rng.randint(3, 5))]
            paths = [os.path.join(root, "digits", f"{d}.wav") for d in seq]
            out.append(Clip("speech", "asterisk-digits", "concat", {"paths": paths, "gap_s": 0.15}, dict(meta),
                            transcript=" ".join(number_word(d) for d in seq), strat="recording:female"))
    return out


@register_planner("pocketsphinx")
def _plan_pocketsphinx(ctx: PlanContext) -> list[Clip]:
    """LibriVox (Sense and Sensibility) and CMU 'cards' test utterances no longer than MAX_SECONDS."""
    if "pocketsphinx" not in ctx.sources:
        return []
    out = []
    meta = {"synthesizer": "recording", "language": "english"}
    for sub, trans in (("librivox", "transcription"), ("cards", "cards.transcription")):
        tpath = os.path.join(ctx.sources["pocketsphinx"], sub, trans)
        if not os.path.isfile(tpath):
            continue
        with open(tpath, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line.endswith(")") or "(" not in line:
                    continue
                text, utt = line.rsplit("(", 1)
                text = " ".join(w for w in text.split() if w not in ("<s>", "</s>"))
                wav = os.path.join(ctx.sources["pocketsphinx"], sub, utt.rstrip(")") + ".wav")
                if text and os.path.isfile(wav) and _duration(wav) <= MAX_SECONDS:
                    out.append(Clip("speech", sub, "file", {"path": wav}, dict(meta), transcript=text,
                                    strat=f"recording:{sub}"))
    return out


@register_planner("alsa")
def _plan_alsa(ctx: PlanContext) -> list[Clip]:
    if "alsa" not in ctx.sources:
        return []
    out = []
    for name in ALSA_CHANNELS:
        wav = os.path.join(ctx.sources["alsa"], name + ".wav")
        if os.path.isfile(wav):
            out.append(Clip("speech", "alsa", "file", {"path": wav},
                            {"synthesizer": "recording", "language": "english"},
                            transcript=name.replace("_", " "), strat="recording:alsa"))
    return out


@register_planner("mixtures")
def _plan_mixtures(ctx: PlanContext) -> list[Clip]:
    """Speech over white/pink/brown noise at a known SNR (speech power over noise power)."""
    out = []
    for i in range(12 * ctx.scale):
        colour, snr = NOISE_COLOURS[i % 3], SNRS_DB[(i // 3) % len(SNRS_DB)]
        if i % 4 < 3:
            voice, gender = _espeak_voice(i)
            synth = "espeak"
        else:
            voice, gender = FLITE_VOICES[(i // 4) % len(FLITE_VOICES)]
            synth = "flite"
        text = ctx.sentence()
        params = {"speech": {"synth": synth, "voice": voice, "rate": "normal", "text": text},
                  "colour": colour, "snr_db": snr, "seed": ctx.rng.randrange(2**31), "lead_s": 0.4, "tail_s": 0.3,
                  "peak": round(ctx.rng.uniform(0.5, 0.9), 3)}
        meta = _tts_meta(synth, voice, gender, "normal") | {"background_noise": f"{colour} noise",
                                                             "snr_db": str(snr)}
        out.append(Clip("speech", "mixture", "mixture", params, meta, transcript=text, strat=f"mixture:{colour}"))
    return out


@register_planner("dialogues")
def _plan_dialogues(ctx: PlanContext) -> list[Clip]:
    """Two speakers (one male, one female espeak-ng voice) taking turns; segments hold who said what."""
    out = []
    pool = list(DIALOGUES)
    ctx.rng.shuffle(pool)
    for i in range(6 * ctx.scale):
        first, second = pool[i % len(pool)]
        a, b = _espeak_voice(2 * i), _espeak_voice(2 * i + 1)
        if i % 2:
            a, b = b, a
        params = {"turns": [{"synth": "espeak", "voice": v, "rate": "normal", "text": t}
                            for (v, _), t in ((a, first), (b, second))], "gap_s": 0.35,
                  "peak": round(ctx.rng.uniform(0.5, 0.9), 3)}
        meta = {"synthesizer": "espeak-ng", "speaking_rate": "normal", "language": "english", "num_speakers": "2",
                "voice": f"{a[0]}, {b[0]}"}
        out.append(Clip("speech", "dialogue", "dialogue", params, meta, transcript=f"{first} {second}",
                        strat="dialogue"))
    return out


@register_planner("events")
def _plan_events(ctx: PlanContext) -> list[Clip]:
    """freedesktop + Yaru event sounds, each distinct recording once (some files are byte-identical)."""
    out, seen = [], set()
    for theme in ("freedesktop", "yaru"):
        if theme not in ctx.sources:
            continue
        for fname in sorted(os.listdir(ctx.sources[theme])):
            stem, ext = os.path.splitext(fname)
            path = os.path.join(ctx.sources[theme], fname)
            if ext not in (".oga", ".ogg", ".wav") or stem not in EVENT_LABELS:
                continue
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            if digest in seen or _duration(path) < 0.1:
                continue
            seen.add(digest)
            label = EVENT_LABELS[stem]
            out.append(Clip("sound", theme, "file", {"path": path, "peak": round(ctx.rng.uniform(0.5, 0.9), 3)},
                            {"label": label}, caption=f"a {label} sound", strat=f"event:{label}"))
    return out


@register_planner("noise")
def _plan_noise(ctx: PlanContext) -> list[Clip]:
    out = []
    for i in range(15 * ctx.scale):
        colour = NOISE_COLOURS[i % 3]
        params = {"colour": colour, "seconds": round(ctx.rng.uniform(1.5, 4.0), 2), "seed": ctx.rng.randrange(2**31),
                  "peak": round(ctx.rng.uniform(0.4, 0.9), 3)}
        out.append(Clip("sound", "noise", "noise", params, {"label": f"{colour} noise", "noise_colour": colour},
                        caption=f"steady {colour} noise", strat=f"noise:{colour}"))
    return out


def _beep_clips(ctx: PlanContext, n: int, offset: int = 0) -> list[Clip]:
    out = []
    for j in range(n):
        i = j + offset
        count, register = 1 + i % 5, REGISTERS[(i // 5) % 3]  # every (count, register) pair once per 15
        freq = ctx.rng.choice(REGISTER_HZ[register])
        params = {"count": count, "freq": freq, "beep_s": round(ctx.rng.uniform(0.15, 0.22), 3),
                  "gap_s": round(ctx.rng.uniform(0.25, 0.35), 3), "lead_s": round(ctx.rng.uniform(0.15, 0.6), 3),
                  "peak": round(ctx.rng.uniform(0.4, 0.9), 3)}
        words = number_word(count)
        caption = f"{words} {register}-pitched beep{'s' if count > 1 else ''}"
        meta = {"label": "beeps" if count > 1 else "beep", "beep_count": str(count), "pitch_register": register,
                "frequency_hz": str(int(freq))}
        out.append(Clip("sound", "beeps", "beeps", params, meta, caption=caption, strat=f"beeps:{count}"))
    return out


@register_planner("beeps")
def _plan_beeps(ctx: PlanContext) -> list[Clip]:
    return _beep_clips(ctx, 15 * ctx.scale)


@register_filler("sound")
def _fill_sound(ctx: PlanContext, n: int) -> list[Clip]:
    return _beep_clips(ctx, n, offset=7)


@register_planner("tones")
def _plan_tones(ctx: PlanContext) -> list[Clip]:
    out = []
    for i in range(6 * ctx.scale):
        register = REGISTERS[i % 3]
        freq = ctx.rng.choice(REGISTER_HZ[register])
        params = {"freq": freq, "seconds": round(ctx.rng.uniform(1.2, 2.5), 2), "peak": round(ctx.rng.uniform(0.4, 0.9), 3)}
        out.append(Clip("sound", "tone", "tone", params,
                        {"label": "tone", "pitch_register": register, "frequency_hz": str(int(freq))},
                        caption=f"a steady {register}-pitched tone", strat=f"tone:{register}"))
    return out


@register_planner("sweeps")
def _plan_sweeps(ctx: PlanContext) -> list[Clip]:
    out = []
    for i in range(8 * ctx.scale):
        direction = ("rising", "falling")[i % 2]
        lo, hi = ctx.rng.choice((150.0, 200.0, 300.0)), ctx.rng.choice((2000.0, 3000.0, 4000.0))
        f0, f1 = (lo, hi) if direction == "rising" else (hi, lo)
        params = {"f0": f0, "f1": f1, "seconds": round(ctx.rng.uniform(1.2, 3.0), 2),
                  "peak": round(ctx.rng.uniform(0.4, 0.9), 3)}
        out.append(Clip("sound", "sweep", "sweep", params, {"label": f"{direction} sweep", "sweep_direction": direction},
                        caption=f"a tone sweeping {'up' if direction == 'rising' else 'down'} in pitch",
                        strat=f"sweep:{direction}"))
    return out


def _sonic_label(stem: str) -> str:
    if stem in SONIC_PI_LABELS:
        return SONIC_PI_LABELS[stem]
    prefix, _, rest = stem.partition("_")
    words = [w for w in rest.split("_") if w]
    words = [w.rstrip("0123456789") for w in words]
    words = [w for w in words if len(w) > 1]  # drop note names ("bass_hard_c") and empty leftovers
    if prefix == "mehackit":
        return f"{words[0]} sound"  # "robot sound", "phone sound"
    if prefix == "vinyl":
        return "vinyl " + " ".join(words)
    if prefix == "glitch":
        return "glitch " + " ".join("percussion" if w == "perc" else w for w in words)
    return " ".join(w for w in words if w)


@register_planner("sonic_pi")
def _plan_sonic_pi(ctx: PlanContext) -> list[Clip]:
    if "sonic_pi" not in ctx.sources:
        return []
    root = ctx.sources["sonic_pi"]
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(root) if f.endswith(".flac"))
    out = []
    for prefix, (domain, category, n) in SONIC_PI_GROUPS.items():
        group = [s for s in stems if s.split("_", 1)[0] == prefix and s not in SONIC_PI_SKIP
                 and _duration(os.path.join(root, s + ".flac")) >= 0.1]
        for stem in sorted(ctx.rng.sample(group, min(len(group), n * ctx.scale))):
            path = os.path.join(root, stem + ".flac")
            cat = category
            if prefix == "loop":
                cat = "drum loop" if stem in DRUM_LOOPS else "synth loop"
            label = _sonic_label(stem)
            params = {"path": path, "loop": prefix == "loop", "peak": round(ctx.rng.uniform(0.5, 0.9), 3)}
            if domain == "sound":
                meta = {"label": label, "category": cat}
                caption = f"a {label} sound"
            else:
                meta = {"category": cat}
                caption = f"a {cat}" if prefix == "loop" else f"a {cat} sample ({label})"
            out.append(Clip(domain, "sonic-pi", "file", params, meta, caption=caption, strat=f"sonic:{cat}"))
    if "loop_3d_printer" in stems:
        out.append(Clip("sound", "sonic-pi", "file", {"path": os.path.join(root, "loop_3d_printer.flac"), "peak": 0.8},
                        {"label": "3d printer", "category": "machine"}, caption="a 3d printer at work",
                        strat="sonic:machine"))
    return out


def _tempo_name(bpm: int) -> str:
    return "slow" if bpm < 80 else "moderate" if bpm <= 120 else "fast"


def _midi_clips(ctx: PlanContext, n: int, offset: int = 0) -> list[Clip]:
    out = []
    for j in range(n):
        i = j + offset
        name, program = INSTRUMENTS[i % len(INSTRUMENTS)]
        k = i // len(INSTRUMENTS)
        register = REGISTERS[k % 3]
        tempo = ("slow", "moderate", "fast")[(i + k) % 3]
        mode = ("major", "minor")[(i + k // 3) % 2]
        root = ctx.rng.randrange(12)
        bpm = ctx.rng.choice(TEMPO_BPM[tempo])
        base = REGISTER_BASE_MIDI[register]
        tonic = base + ((root - base) % 12)
        if tonic > base + 6:
            tonic -= 12
        notes = _melody(ctx.rng, tonic, SCALES[mode], bpm)
        key = f"{NOTE_NAMES[root]} {mode}"
        meta = {"instrument": name, "key": key, "mode": mode, "tempo_bpm": str(bpm), "tempo": _tempo_name(bpm),
                "pitch_register": register}
        params = {"program": program, "bpm": bpm, "notes": notes, "peak": round(ctx.rng.uniform(0.5, 0.9), 3)}
        caption = f"a {name} playing a {_tempo_name(bpm)} melody in {key}, {register} register"
        out.append(Clip("music", "midi", "midi", params, meta, caption=caption, strat=f"midi:{name}"))
    return out


def _melody(rng: random.Random, tonic: int, scale: tuple[int, ...], bpm: int) -> list[list[float]]:
    """A one-octave phrase: rising tonic arpeggio, a stepwise walk, the tonic, then the tonic triad.

    About 3.5 s of quarter notes (so the tempo is audible as the note rate) + a 1.5-beat closing chord.
    Returns [start_beat, length_beats, midi_note, velocity] rows."""
    n = max(4, min(10, round(3.5 * bpm / 60)))
    degrees = [0, 2, 4, 7][: min(4, n - 1)]
    d = 4
    while len(degrees) < n - 1:
        d = max(0, min(7, d + rng.choice((-2, -1, -1, 1, 1, 2))))
        degrees.append(d)
    degrees.append(0)
    notes = [[float(t), 0.9, tonic + scale[deg], rng.randint(90, 110)] for t, deg in enumerate(degrees)]
    notes += [[float(n), 1.5, tonic + scale[deg], 85] for deg in (0, 2, 4)]
    return notes


@register_planner("midi")
def _plan_midi(ctx: PlanContext) -> list[Clip]:
    return _midi_clips(ctx, 6 * len(INSTRUMENTS) * ctx.scale)


@register_filler("music")
def _fill_music(ctx: PlanContext, n: int) -> list[Clip]:
    return _midi_clips(ctx, n, offset=3)


@register_planner("instructions")
def _plan_instructions(ctx: PlanContext, n: int | None = None) -> list[Clip]:
    n = 84 * ctx.scale if n is None else n
    out = []
    for i, (text, answer, kind) in enumerate(instruction_items(ctx.rng, n)):
        if i % 3 == 2:  # flite: slt (female) every other time, else a male voice
            j = i // 3
            voice, gender = FLITE_VOICES[0] if j % 2 == 0 else FLITE_VOICES[1 + (j // 2) % 3]
            synth = "flite"
        else:
            voice, gender = _espeak_voice(i)
            synth = "espeak"
        rate = ("normal", "normal", "slow", "fast")[(i // 2) % 4]
        clip = _tts_clip(ctx, "instruction", f"{synth}-question", synth, voice, gender, rate, text,
                         f"instruction:{kind}", {"answer": answer} if answer is not None else None)
        out.append(clip)
    return out


register_filler("instruction")(_plan_instructions)


def plan(seed: int = 0, scale: int = 1, sources: dict[str, str] | None = None) -> list[Clip]:
    """Every clip of the demo with its facts, paths and split (no audio yet). Deterministic."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    ctx = PlanContext(seed, scale, available_sources() if sources is None else sources, random.Random(seed))
    clips = [c for fn in PLANNERS.values() for c in fn(ctx)]
    counts = Counter(c.domain for c in clips)
    for domain in DOMAINS:  # top up with synthetic clips where optional recordings are missing
        short = MIN_PER_DOMAIN + 6 - counts[domain]
        if short > 0 and counts[domain] < MIN_PER_DOMAIN:
            clips += FILLERS[domain](ctx, short)
    numbering: Counter[tuple[str, str]] = Counter()
    for c in clips:
        numbering[c.domain, c.source] += 1
        c.audio = f"{c.domain}/{c.source}-{numbering[c.domain, c.source]:04d}.wav"
    _assign_test_split(clips, seed)
    return clips


def _assign_test_split(clips: list[Clip], seed: int) -> None:
    """Hold out every TEST_EVERY-th clip of each domain, ordered by stratum then a seeded hash, so each
    stratum (gender, noise colour, instrument, ...) gets its share of the test split."""
    for domain in DOMAINS:
        members = [c for c in clips if c.domain == domain]
        members.sort(key=lambda c: (c.strat, hashlib.sha1(f"{seed}:{c.audio}".encode()).hexdigest()))
        for j, c in enumerate(members):
            c.split = "test" if j % TEST_EVERY == seed % TEST_EVERY else None


# ------------------------------------------------------------------------------------------ rendering
@dataclass
class Rendered:
    audio: np.ndarray  # float32 mono at SAMPLE_RATE
    segments: list[dict[str, Any]] | None = None


Renderer = Callable[[dict[str, Any], "RenderEnv"], Rendered]
RENDERERS: dict[str, Renderer] = {}


def register_renderer(name: str) -> Callable[[Renderer], Renderer]:
    def deco(fn: Renderer) -> Renderer:
        RENDERERS[name] = fn
        return fn

    return deco


@dataclass
class RenderEnv:
    tmp_dir: str
    soundfont: str
    _local: threading.local = field(default_factory=threading.local)

    def tmp(self, suffix: str) -> str:
        """A per-thread scratch path (renders run in a thread pool)."""
        n = getattr(self._local, "n", 0) + 1
        self._local.n = n
        return os.path.join(self.tmp_dir, f"{threading.get_ident()}-{n}{suffix}")


def _run(cmd: list[str]) -> bytes:
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout


def sox_load(path: str, effects: tuple[str, ...] = ()) -> np.ndarray:
    """Any file sox reads -> float32 mono at SAMPLE_RATE (sox mixes channels down and resamples)."""
    raw = _run(["sox", "-V1", path, "-t", "raw", "-e", "floating-point", "-b", "32", "-r", str(SAMPLE_RATE),
                "-c", "1", "-", *effects])
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _speak(spec: dict[str, Any], env: RenderEnv) -> np.ndarray:
    out = env.tmp(".wav")
    if spec["synth"] == "espeak":
        _run(["espeak-ng", "-v", spec["voice"], "-s", str(ESPEAK_WPM[spec["rate"]]), "-w", out, spec["text"]])
    else:
        _run(["flite", "-voice", spec["voice"], "--setf", f"duration_stretch={FLITE_STRETCH[spec['rate']]}",
              "-t", spec["text"], "-o", out])
    try:
        return sox_load(out)
    finally:
        os.unlink(out)


@register_renderer("tts")
def _render_tts(p: dict[str, Any], env: RenderEnv) -> Rendered:
    return Rendered(_speak(p, env))


@register_renderer("dialogue")
def _render_dialogue(p: dict[str, Any], env: RenderEnv) -> Rendered:
    parts, segments, t = [], [], 0
    gap = np.zeros(int(p["gap_s"] * SAMPLE_RATE), np.float32)
    for k, turn in enumerate(p["turns"]):
        wav = _speak(turn, env)
        segments.append({"start": round(t / SAMPLE_RATE, 2), "end": round((t + len(wav)) / SAMPLE_RATE, 2),
                         "speaker": k + 1, "text": turn["text"]})
        parts += [wav, gap]
        t += len(wav) + len(gap)
    return Rendered(np.concatenate(parts[:-1]), segments=segments)


def colored_noise(colour: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """White (flat), pink (-3 dB/octave) or brown (-6 dB/octave) noise with unit RMS."""
    white = rng.standard_normal(n)
    if colour != "white":
        spec = np.fft.rfft(white)
        f = np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 20.0)
        spec *= 1.0 / np.sqrt(f) if colour == "pink" else 1.0 / f
        spec[0] = 0.0
        white = np.fft.irfft(spec, n)
    return (white / (np.sqrt(np.mean(white**2)) + 1e-12)).astype(np.float32)


def _ramp(x: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    k = min(len(x) // 2, int(seconds * SAMPLE_RATE))
    if k > 0:
        w = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k, dtype=np.float32))
        x = x.copy()
        x[:k] *= w
        x[-k:] *= w[::-1]
    return x


@register_renderer("noise")
def _render_noise(p: dict[str, Any], env: RenderEnv) -> Rendered:
    x = colored_noise(p["colour"], int(p["seconds"] * SAMPLE_RATE), np.random.default_rng(p["seed"]))
    return Rendered(_ramp(x, 0.02))


@register_renderer("mixture")
def _render_mixture(p: dict[str, Any], env: RenderEnv) -> Rendered:
    speech = _speak(p["speech"], env)
    lead, tail = int(p["lead_s"] * SAMPLE_RATE), int(p["tail_s"] * SAMPLE_RATE)
    noise = colored_noise(p["colour"], lead + len(speech) + tail, np.random.default_rng(p["seed"]))
    p_speech = float(np.mean(speech.astype(np.float64) ** 2))
    noise *= math.sqrt(p_speech / 10 ** (p["snr_db"] / 10))  # noise RMS^2 = speech power / SNR
    mix = noise.copy()
    mix[lead:lead + len(speech)] += speech
    return Rendered(_ramp(mix, 0.02))


def _sine(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    return np.sin(2 * np.pi * freq * t).astype(np.float32)


@register_renderer("beeps")
def _render_beeps(p: dict[str, Any], env: RenderEnv) -> Rendered:
    beep = _ramp(_sine(p["freq"], p["beep_s"]))
    gap = np.zeros(int(p["gap_s"] * SAMPLE_RATE), np.float32)
    parts = [np.zeros(int(p["lead_s"] * SAMPLE_RATE), np.float32)]
    for k in range(p["count"]):
        parts += [beep] + ([gap] if k < p["count"] - 1 else [])
    parts.append(np.zeros(int(0.3 * SAMPLE_RATE), np.float32))
    return Rendered(np.concatenate(parts))


@register_renderer("tone")
def _render_tone(p: dict[str, Any], env: RenderEnv) -> Rendered:
    return Rendered(_ramp(_sine(p["freq"], p["seconds"]), 0.02))


@register_renderer("sweep")
def _render_sweep(p: dict[str, Any], env: RenderEnv) -> Rendered:
    n, T = int(p["seconds"] * SAMPLE_RATE), p["seconds"]
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    k = p["f1"] / p["f0"]
    phase = 2 * np.pi * p["f0"] * T / math.log(k) * (k ** (t / T) - 1.0)  # exponential sweep
    return Rendered(_ramp(np.sin(phase).astype(np.float32), 0.02))


@register_renderer("file")
def _render_file(p: dict[str, Any], env: RenderEnv) -> Rendered:
    x = sox_load(p["path"])
    if p.get("loop") and 0 < len(x) < 2 * SAMPLE_RATE:  # short loops repeat (that is what a loop is for)
        x = np.tile(x, math.ceil(2 * SAMPLE_RATE / len(x)))
    return Rendered(x)


@register_renderer("concat")
def _render_concat(p: dict[str, Any], env: RenderEnv) -> Rendered:
    gap = np.zeros(int(p["gap_s"] * SAMPLE_RATE), np.float32)
    parts = []
    for path in p["paths"]:
        parts += [_trim_silence(sox_load(path), keep_s=0.03), gap]
    return Rendered(np.concatenate(parts[:-1]))


def _trim_silence(x: np.ndarray, threshold: float = 1e-3, keep_s: float = 0.2) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > threshold * max(float(np.abs(x).max()), 1e-9))
    if len(loud) == 0:
        return x
    keep = int(keep_s * SAMPLE_RATE)
    return x[max(0, loud[0] - keep): loud[-1] + keep]


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(out))


def midi_file(notes: list[list[float]], program: int, bpm: int, ticks_per_beat: int = 480) -> bytes:
    """A format-0 Standard MIDI File: tempo, program change, then note on/off on channel 0."""
    events = []
    for start, length, pitch, velocity in notes:
        on, off = int(start * ticks_per_beat), int((start + length) * ticks_per_beat)
        events += [(on, 1, bytes([0x90, int(pitch), int(velocity)])), (off, 0, bytes([0x80, int(pitch), 0]))]
    events.sort(key=lambda e: (e[0], e[1]))  # note-offs before note-ons at the same tick
    track = b"\x00\xff\x51\x03" + (60_000_000 // bpm).to_bytes(3, "big") + b"\x00" + bytes([0xC0, program])
    now = 0
    for tick, _, msg in events:
        track += _vlq(tick - now) + msg
        now = tick
    track += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_beat) + b"MTrk" + struct.pack(">I", len(track)) + track


@register_renderer("midi")
def _render_midi(p: dict[str, Any], env: RenderEnv) -> Rendered:
    mid, wav = env.tmp(".mid"), env.tmp(".wav")
    with open(mid, "wb") as f:
        f.write(midi_file(p["notes"], p["program"], p["bpm"]))
    try:
        _run(["fluidsynth", "-ni", "-q", "-g", "0.8", "-r", str(SAMPLE_RATE), "-F", wav, env.soundfont, mid])
        return Rendered(_trim_silence(sox_load(wav), threshold=3e-3, keep_s=0.05))
    finally:
        for path in (mid, wav):
            if os.path.exists(path):
                os.unlink(path)


def _finish(clip: Clip, r: Rendered) -> np.ndarray:
    x = np.nan_to_num(np.asarray(r.audio, np.float32))
    if len(x) > MAX_SECONDS * SAMPLE_RATE:
        if clip.transcript is not None:  # never cut words: planners only pick short-enough speech
            log.warning("demo clip %s is %.1f s (> %.0f s), kept whole", clip.audio, len(x) / SAMPLE_RATE, MAX_SECONDS)
        else:
            x = x[: int(MAX_SECONDS * SAMPLE_RATE)].copy()
            k = int(0.2 * SAMPLE_RATE)
            x[-k:] *= np.linspace(1.0, 0.0, k, dtype=np.float32)
    if len(x) < MIN_SECONDS * SAMPLE_RATE:
        x = np.concatenate([x, np.zeros(int(MIN_SECONDS * SAMPLE_RATE) - len(x), np.float32)])
    peak = float(np.abs(x).max())
    if peak > 0:
        x = x * (float(clip.params.get("peak", 0.7)) / peak)
    return x


def render(clip: Clip, out_dir: str, env: RenderEnv) -> Clip:
    r = RENDERERS[clip.kind](clip.params, env)
    x = _finish(clip, r)
    if r.segments is not None:
        clip.segments = r.segments
    path = os.path.join(out_dir, clip.audio)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part.wav"
    sf.write(tmp, x, SAMPLE_RATE, subtype="PCM_16")
    os.replace(tmp, path)
    return clip


# ------------------------------------------------------------------------------------------ the build
def _stamp(seed: int, scale: int) -> str:
    # The module's own hash too: editing the plan (words, labels, counts) invalidates earlier builds.
    with open(__file__, "rb") as f:
        code = hashlib.sha1(f.read()).hexdigest()[:12]
    return json.dumps({"version": DEMO_VERSION, "code": code, "seed": seed, "scale": scale}, sort_keys=True)


def _is_done(out_dir: str, seed: int, scale: int) -> bool:
    stamp, manifest = os.path.join(out_dir, STAMP), os.path.join(out_dir, MANIFEST)
    if not (os.path.isfile(stamp) and os.path.isfile(manifest)):
        return False
    with open(stamp, encoding="utf-8") as f:
        return f.read().strip() == _stamp(seed, scale)


def _iter_rendered(clips: list[Clip], out_dir: str, env: RenderEnv, workers: int) -> Iterator[Clip | None]:
    """Render in a thread pool (the work happens in subprocesses); yields in plan order, None = failed."""
    def one(c: Clip) -> Clip | None:
        try:
            return render(c, out_dir, env)
        except Exception as e:  # one bad source file must not sink the demo
            log.warning("demo clip %s (%s) failed: %s", c.audio, c.kind, e)
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(one, clips)


def synthesize_demo(out_dir: str, seed: int = 0, scale: int = 1, progress: bool = True) -> str:
    """Build the demo corpus under out_dir (audio + manifest.jsonl) and return the manifest's path.

    Returns at once when out_dir already holds a finished build for this (version, seed, scale).
    Raises DemoAssetsError if a required Debian package is missing (run scripts/setup.sh); optional
    recordings that are missing are skipped with a warning and replaced by synthetic clips."""
    out_dir = os.path.abspath(out_dir)
    manifest = os.path.join(out_dir, MANIFEST)
    if _is_done(out_dir, seed, scale):
        return manifest
    soundfont = check_tools()
    clips = plan(seed, scale)
    os.makedirs(out_dir, exist_ok=True)
    stamp_path = os.path.join(out_dir, STAMP)
    if os.path.exists(stamp_path):  # a different earlier build: drop its files, they are ours
        os.unlink(stamp_path)
        for domain in DOMAINS:
            shutil.rmtree(os.path.join(out_dir, domain), ignore_errors=True)
    workers = max(2, min(4, os.cpu_count() or 2))
    done: list[Clip] = []
    with tempfile.TemporaryDirectory(prefix=".demo-tmp-", dir=out_dir) as tmp:
        env = RenderEnv(tmp, soundfont)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(clips), desc="demo corpus", unit="clip", disable=not progress)
        for c in _iter_rendered(clips, out_dir, env, workers):
            if c is not None:
                done.append(c)
            bar.update(1)
        bar.close()
    counts = Counter(c.domain for c in done)
    low = {d: counts[d] for d in DOMAINS if counts[d] < MIN_PER_DOMAIN}
    if low:
        raise RuntimeError(f"demo corpus: too few clips rendered per domain {low} (need {MIN_PER_DOMAIN}); "
                           f"see the warnings above")
    tmp_manifest = manifest + ".part"
    with open(tmp_manifest, "w", encoding="utf-8") as f:
        for c in done:
            f.write(json.dumps(c.row(), ensure_ascii=False) + "\n")
    os.replace(tmp_manifest, manifest)
    with open(stamp_path, "w", encoding="utf-8") as f:
        f.write(_stamp(seed, scale) + "\n")
    log.info("demo corpus: %d clips (%s) in %s", len(done), dict(counts), out_dir)
    return manifest
