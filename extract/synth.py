"""`avb synth`: a generated corpus in the official A-VB layout whose audio carries its labels.

Why it exists: HUME-VB is licensed and absent from CI, laptops and this repository, yet every stage (corpus
reader, fine-tuning, dump, heads, ensemble, `avb demo`) must be exercised end to end -- and a test can only
prove that a model *learns* if the labels are recoverable from the sound. So each clip is rendered from the
same hidden causes that produce its labels:

* `Voc_Type` picks a sound recipe (Gasp: short noisy breath; Laugh: ~5 Hz voiced pulses; Cry: wavering tone
  with vibrato; Scream: loud, high, bright harmonic tone; Grunt: low short buzz; Groan: long low falling tone;
  Pant: ~2.5 Hz noise bursts; Other: a random blend of the others).
* A latent vector z ~ N(type mean, I) of four factors -- activation, pleasantness, roughness, tension -- shapes
  the sound (activation: loudness, pitch, pulse rate; pleasantness: brightness and rising vs. falling pitch;
  roughness: noise-to-harmonic ratio; tension: vibrato depth) and also the labels: Arousal and Valence are
  noisy sigmoids of activation and pleasantness, the 10 High emotions are sigmoid(W z + type effect + noise)
  max-normalised per clip, and the 40 Culture columns are the High emotions shifted by a fixed per-country bias
  plus small noise. The noise keeps the labels from being a deterministic function of the audio.

The layout, column names and order are exactly the official ones (as `heads.tasks` lists them; the layout is
described in the README, "The workflow on the real corpus"), Test rows have empty label cells, and the same seed gives byte-identical files. Beside the
official files sits `synth_config.json` (the resolved settings): it marks the folder as a synth corpus, so a
rerun may replace it without `--overwrite`, and documents how the corpus was made.

`--layout described` (`synthesize_described`) writes instead a corpus described by a `corpus.yaml` -- the
format any corpus can be brought in -- with one `labels.csv` (id, split, speaker, emotion, intensity, valence,
arousal), `audio/<id>.flac` (or .wav) and speaker-disjoint splits: 7 emotions that pick a sound recipe and
the latent means, `intensity` normal/strong from activation, valence and arousal on a 1..9 scale. `--tasks`
picks which of its tasks (emotion, intensity, affect) the yaml describes; labels.csv keeps every column.
"""
from __future__ import annotations

import csv
import inspect
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from scipy.io import wavfile
from scipy.signal import lfilter
from tqdm.auto import tqdm

from cache.command_kit.atomic import atomic_path, write_json_atomic, write_text_atomic
from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.options import (
    OptionOrArgumentCommand,
    option_or_argument,
    progress_option,
)
from extract.audio import write_wav
from heads.submission import number_text
from heads.tasks import AVB, COUNTRIES, EMOTIONS, SPLITS, TYPE_CLASSES

# The A-VB tasks whose columns the official layout's CSVs hold.
TYPE, TWO, HIGH, CULTURE = (AVB[name] for name in ("type", "two", "high", "culture"))

MARKER = "synth_config.json"
LABEL_FILES = ("data_info.csv", "high_info.csv", "two_info.csv", "culture_info.csv", "type_info.csv")
LATENTS = ("activation", "pleasantness", "roughness", "tension")

# Class frequencies: the real Train counts (avb-format.md) tempered by a square root, so the corpus keeps the
# real ordering (Gasp most, Pant least) while the rare classes still get enough clips to learn from.
_REAL_TYPE_COUNTS = {"Gasp": 7104, "Laugh": 4940, "Cry": 1845, "Scream": 1573, "Grunt": 1347, "Groan": 1366,
                     "Pant": 467, "Other": 1348}
TYPE_PROBS = np.sqrt(np.array([_REAL_TYPE_COUNTS[t] for t in TYPE_CLASSES], dtype=np.float64))
TYPE_PROBS /= TYPE_PROBS.sum()
# Speaker countries in the real Train+Val proportions.
_REAL_COUNTRY_COUNTS = {"China": 10119, "United States": 14162, "South Africa": 9894, "Venezuela": 5211}
COUNTRY_PROBS = np.array([_REAL_COUNTRY_COUNTS[c] for c in COUNTRIES], dtype=np.float64)
COUNTRY_PROBS /= COUNTRY_PROBS.sum()

# Durations: log-normal, clipped to [min_seconds, max_seconds]; with the per-type length factors below the
# mean is ~2.2 s like HUME-VB (mean 2.24 s, 0.53-9.96 s).
DURATION_SIGMA = 0.55
DURATION_MEDIAN = 2.0


class SynthError(AvbError):
    """A bad request to the corpus generator (shown to CLI users as `Error: ...`)."""


@dataclass(frozen=True)
class Recipe:
    """How one vocal-burst type sounds before the latent factors modulate it."""

    f0: float              # Hz, base pitch of the voiced part
    length: float          # multiplies the sampled duration
    noise_logit: float     # logit of the noise share (breathy/noisy > 0, clean tone < 0)
    level_db: float        # loudness offset
    tilt: float            # harmonic k has amplitude k**-tilt: larger is darker
    glide: float           # pitch change over the clip in octaves (falling < 0)
    pulse_rate: float = 0.0  # Hz of amplitude pulses (0: one continuous burst)
    duty: float = 0.5      # share of each pulse period that sounds
    vibrato_rate: float = 0.0
    vibrato_depth: float = 0.0  # relative pitch excursion
    attack: float = 0.02   # seconds
    decay: float = 0.0     # exponential decay time as a share of the clip (0: sustained)


RECIPES: dict[str, Recipe] = {
    "Gasp": Recipe(f0=350, length=0.55, noise_logit=3.0, level_db=-4, tilt=1.0, glide=0.3, attack=0.03,
                   decay=0.35),
    "Laugh": Recipe(f0=260, length=1.3, noise_logit=0.0, level_db=0, tilt=1.2, glide=-0.2, pulse_rate=5.0,
                    duty=0.45, attack=0.01),
    "Cry": Recipe(f0=420, length=1.3, noise_logit=-1.0, level_db=-2, tilt=1.3, glide=-0.3, vibrato_rate=6.0,
                  vibrato_depth=0.08, attack=0.08),
    "Scream": Recipe(f0=950, length=1.0, noise_logit=-1.5, level_db=7, tilt=0.7, glide=0.1, vibrato_rate=4.0,
                     vibrato_depth=0.02, attack=0.05),
    "Grunt": Recipe(f0=95, length=0.55, noise_logit=-0.5, level_db=-1, tilt=0.5, glide=-0.1, attack=0.01,
                    decay=0.5),
    "Groan": Recipe(f0=140, length=1.4, noise_logit=-2.0, level_db=-5, tilt=1.8, glide=-0.8, vibrato_rate=3.0,
                    vibrato_depth=0.01, attack=0.15),
    "Pant": Recipe(f0=300, length=1.2, noise_logit=3.0, level_db=-6, tilt=1.0, glide=0.0, pulse_rate=2.5,
                   duty=0.35, attack=0.01),
    # "Other" has no fixed recipe: each clip blends two of the above (see _other_recipe).
}

# Mean of the latent factors (activation, pleasantness, roughness, tension) per type: screams are aroused,
# laughs pleasant, cries unpleasant and tense, groans low in activation.
TYPE_LATENT_MEAN: dict[str, tuple[float, float, float, float]] = {
    "Gasp": (0.3, -0.2, 0.3, 0.5), "Laugh": (0.5, 1.0, 0.0, -0.5), "Cry": (0.0, -1.0, 0.2, 0.6),
    "Scream": (1.2, -0.6, 0.4, 0.8), "Grunt": (-0.2, -0.3, 0.5, 0.2), "Groan": (-0.8, -0.6, 0.0, 0.3),
    "Pant": (0.4, 0.2, 0.2, 0.0), "Other": (0.0, 0.0, 0.0, 0.0),
}

# Emotion logits = W z + type effect + noise. Rows follow EMOTIONS, columns LATENTS.
EMOTION_WEIGHTS = np.array([
    [0.3, 0.8, -0.5, 0.3],    # Awe
    [1.2, 0.9, 0.0, 0.0],     # Excitement
    [0.5, 1.2, 0.2, -0.3],    # Amusement
    [-0.6, 0.0, 0.3, 0.6],    # Awkwardness
    [0.8, -0.9, 0.4, 0.8],    # Fear
    [0.9, -1.2, 0.7, 0.3],    # Horror
    [0.5, -1.0, 0.6, 0.6],    # Distress
    [1.0, 1.0, 0.3, -0.4],    # Triumph
    [-0.9, -1.0, 0.0, 0.7],   # Sadness
    [0.7, 0.2, -0.2, 0.2],    # Surprise
])
TYPE_EMOTION_EFFECT: dict[str, dict[str, float]] = {
    "Gasp": {"Surprise": 1.2, "Awe": 0.8, "Fear": 0.4},
    "Laugh": {"Amusement": 1.5, "Excitement": 0.5},
    "Cry": {"Sadness": 1.5, "Distress": 0.6},
    "Scream": {"Fear": 1.0, "Horror": 1.0, "Excitement": 0.3},
    "Grunt": {"Distress": 0.6, "Awkwardness": 0.6},
    "Groan": {"Distress": 0.8, "Sadness": 0.5, "Awkwardness": 0.3},
    "Pant": {"Excitement": 0.6, "Triumph": 0.8},
    "Other": {},
}
# Per-country shift of each emotion's rating (Culture = High + bias + noise, clipped); rows follow COUNTRIES,
# columns EMOTIONS. Small and fixed, so the four cultures agree mostly but not exactly, as in HUME-VB.
COUNTRY_BIAS = np.array([
    [0.05, -0.03, -0.06, 0.04, 0.02, 0.03, 0.05, -0.04, 0.06, -0.02],    # China
    [-0.02, 0.05, 0.06, -0.03, -0.01, 0.00, -0.02, 0.05, -0.04, 0.03],   # United States
    [0.03, 0.02, -0.02, -0.05, 0.04, 0.05, 0.03, 0.02, 0.01, -0.04],     # South Africa
    [-0.04, 0.06, 0.04, 0.02, -0.03, -0.05, -0.03, 0.06, -0.02, 0.05],   # Venezuela
])
VA_NOISE = 0.25          # logit noise of Valence / Arousal
EMOTION_NOISE = 0.3      # logit noise of the High emotions
CULTURE_NOISE = 0.04     # additive noise of the Culture ratings


@dataclass(frozen=True)
class SynthConfig:
    """The settings of one generated corpus (written to synth_config.json)."""

    clips: int
    seed: int
    min_seconds: float = 0.5
    max_seconds: float = 10.0
    sample_rate: int = 16000
    generator: str = "extract.synth v1"
    type_probs: dict[str, float] = field(default_factory=lambda: dict(zip(TYPE_CLASSES, TYPE_PROBS.round(4))))

    def validate(self) -> None:
        if self.clips < 3:
            raise SynthError(f"--clips must be at least 3 (one per split), got {self.clips}")
        if self.seed < 0:
            raise SynthError(f"--seed must be a non-negative integer, got {self.seed}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise SynthError(f"need 0 < --min-seconds <= --max-seconds, got {self.min_seconds} and "
                             f"{self.max_seconds}")
        if self.sample_rate < 4000:
            raise SynthError(f"--sample-rate must be at least 4000 Hz, got {self.sample_rate}")


@dataclass(frozen=True)
class Clip:
    """One generated clip: what the CSVs say about it (its audio is rendered from the same fields)."""

    clip_id: str
    split: str
    voc_type: str
    country: str
    seconds: float
    latent: np.ndarray        # [4]
    high: np.ndarray          # [10], max-normalised
    two: np.ndarray           # [2] Valence, Arousal (TWO.columns order)
    culture: np.ndarray       # [40] in CULTURE.columns order


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def assign_splits_and_types(clips: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Splits in near-equal thirds, randomly interleaved; types drawn from TYPE_PROBS, except that every split
    with at least 8 clips gets each of the 8 types at least once (so Val UAR is defined over all classes)."""
    splits = np.array([SPLITS[i % 3] for i in range(clips)], dtype=object)
    rng.shuffle(splits)
    types = rng.choice(len(TYPE_CLASSES), size=clips, p=TYPE_PROBS)
    for split in SPLITS:
        members = np.flatnonzero(splits == split)
        if len(members) >= len(TYPE_CLASSES):
            chosen = rng.choice(members, size=len(TYPE_CLASSES), replace=False)
            types[chosen] = rng.permutation(len(TYPE_CLASSES))
    return [str(s) for s in splits], [TYPE_CLASSES[t] for t in types]


def _culture_index() -> list[tuple[int, int]]:
    """(country index, emotion index) of each Culture column, parsed from the official names."""
    pairs = []
    for column in CULTURE.columns:
        country, emotion = column.rsplit("_", 1)
        pairs.append((COUNTRIES.index(country), EMOTIONS.index(emotion)))
    return pairs


_CULTURE_PAIRS = _culture_index()


def make_clip(clip_id: str, split: str, voc_type: str, cfg: SynthConfig, rng: np.random.Generator) -> Clip:
    """Draw a clip's hidden causes and the labels they imply."""
    country = COUNTRIES[int(rng.choice(len(COUNTRIES), p=COUNTRY_PROBS))]
    length = RECIPES[voc_type].length if voc_type in RECIPES else 1.0
    seconds = DURATION_MEDIAN * length * math.exp(DURATION_SIGMA * rng.standard_normal())
    seconds = float(np.clip(seconds, cfg.min_seconds, cfg.max_seconds))
    z = np.asarray(TYPE_LATENT_MEAN[voc_type]) + rng.standard_normal(len(LATENTS))

    valence = _sigmoid(1.1 * z[1] + VA_NOISE * rng.standard_normal())
    arousal = _sigmoid(1.1 * z[0] + VA_NOISE * rng.standard_normal())
    two = np.array([{"Valence": valence, "Arousal": arousal}[c] for c in TWO.columns], dtype=np.float64)

    effect = np.array([TYPE_EMOTION_EFFECT[voc_type].get(e, 0.0) for e in EMOTIONS])
    emotions = _sigmoid(EMOTION_WEIGHTS @ z + effect - 0.5 + EMOTION_NOISE * rng.standard_normal(len(EMOTIONS)))
    high = emotions / emotions.max()

    noise = CULTURE_NOISE * rng.standard_normal(len(_CULTURE_PAIRS))
    culture = np.array([high[e] + COUNTRY_BIAS[c, e] for c, e in _CULTURE_PAIRS]) + noise
    culture = np.clip(culture, 0.0, 1.0)
    high_cols = np.array([high[EMOTIONS.index(c)] for c in HIGH.columns])
    return Clip(clip_id, split, voc_type, country, seconds, z, high_cols, two, culture)


def _other_recipe(rng: np.random.Generator) -> Recipe:
    """'Other' bursts: a random blend of two real recipes, so the class is varied and hard, as in HUME-VB."""
    names = sorted(RECIPES)
    a, b = rng.choice(len(names), size=2, replace=False)
    w = float(rng.uniform(0.3, 0.7))
    ra, rb = asdict(RECIPES[names[a]]), asdict(RECIPES[names[b]])
    mixed = {k: w * ra[k] + (1 - w) * rb[k] for k in ra}
    mixed["f0"] = math.exp(w * math.log(ra["f0"]) + (1 - w) * math.log(rb["f0"]))
    return replace(RECIPES["Gasp"], **mixed)


def render_audio(clip: Clip, sample_rate: int, rng: np.random.Generator, *,
                 recipe: Recipe | None = None) -> np.ndarray:
    """The clip's waveform (float64 in [-1, 1]) from its type recipe (or `recipe`, e.g. one shifted to a
    speaker's voice) modulated by its latent factors."""
    if recipe is None:
        recipe = RECIPES[clip.voc_type] if clip.voc_type in RECIPES else _other_recipe(rng)
    activation, pleasantness, roughness, tension = clip.latent
    n = max(1, round(clip.seconds * sample_rate))
    t = np.arange(n) / sample_rate
    frac = t / max(clip.seconds, 1e-9)

    # Pitch: activation raises it, pleasantness makes the contour rise, tension deepens the vibrato.
    f0 = recipe.f0 * 2.0 ** (0.3 * activation)
    glide = recipe.glide + 0.35 * pleasantness
    depth = recipe.vibrato_depth * 2.0 ** (0.5 * tension) + 0.01 * math.log1p(math.exp(tension))
    vib_rate = recipe.vibrato_rate if recipe.vibrato_rate > 0 else 5.0
    pitch = f0 * 2.0 ** (glide * (frac - 0.5)) * (1.0 + depth * np.sin(2 * np.pi * vib_rate * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    # Harmonics up to 0.45 * sample rate (no aliasing at 8 kHz); pleasantness brightens (smaller tilt).
    tilt = float(np.clip(recipe.tilt - 0.35 * pleasantness, 0.3, 3.0))
    n_harm = int(max(1, min(20, 0.45 * sample_rate // max(pitch.max(), 1.0))))
    voiced = np.zeros(n)
    for k in range(1, n_harm + 1):
        voiced += k ** -tilt * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    voiced /= np.sqrt(np.mean(voiced ** 2)) + 1e-12

    # Noise: coloured by the same tilt (one-pole low-pass), share set by roughness.
    white = rng.standard_normal(n)
    pole = float(np.clip(0.25 * tilt, 0.0, 0.9))
    noise = lfilter([1.0 - pole], [1.0, -pole], white)
    noise /= np.sqrt(np.mean(noise ** 2)) + 1e-12
    share = float(_sigmoid(recipe.noise_logit + 0.9 * roughness))
    signal = math.sqrt(1 - share) * voiced + math.sqrt(share) * noise

    # Envelope: attack, optional decay, optional pulses whose rate rises with activation.
    env = np.minimum(1.0, t / max(recipe.attack, 1.0 / sample_rate))
    env *= np.minimum(1.0, (clip.seconds - t) / 0.02)  # 20 ms release, no click at the end
    if recipe.decay > 0:
        env *= np.exp(-frac / recipe.decay)
    if recipe.pulse_rate > 0:
        rate = recipe.pulse_rate * 2.0 ** (0.2 * activation)
        cycle = (t * rate + rng.uniform()) % 1.0
        on = cycle < recipe.duty
        env *= np.where(on, np.sin(np.pi * np.minimum(cycle / recipe.duty, 1.0)) ** 2, 0.0)
    signal = signal * np.clip(env, 0.0, 1.0)

    # Loudness: activation makes it louder; set the RMS over the sounding part, then keep the peak below 1.
    level_db = float(np.clip(-24.0 + recipe.level_db + 4.0 * activation, -45.0, -9.0))
    sounding = env > 0.05
    rms = np.sqrt(np.mean(signal[sounding] ** 2)) if sounding.any() else 0.0
    signal = signal * (10 ** (level_db / 20) / (rms + 1e-12))
    peak = np.abs(signal).max()
    if peak > 0.98:
        signal *= 0.98 / peak
    return signal


def _label_text(value: float) -> str:
    """A generated label, rounded to 6 decimals as the official CSVs' precision allows for."""
    return number_text(round(float(value), 6))


def _csv_text(header: tuple[str, ...], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def label_tables(clips: list[Clip]) -> dict[str, str]:
    """The text of the five official label CSVs (Test rows: split only, every label cell empty)."""
    headers = {
        "data_info.csv": ("File_ID", "Split", "Country") + HIGH.columns + TWO.columns + CULTURE.columns,
        "high_info.csv": ("File_ID", "Split") + HIGH.columns,
        "two_info.csv": ("File_ID", "Split") + TWO.columns,
        "culture_info.csv": ("File_ID", "Split") + CULTURE.columns,
        "type_info.csv": ("File_ID", "Split") + TYPE.columns,
    }
    rows: dict[str, list[list[str]]] = {name: [] for name in headers}
    for clip in clips:
        head = [f"[{clip.clip_id}]", clip.split]
        hidden = clip.split == "Test"
        high = ["" if hidden else _label_text(v) for v in clip.high]
        two = ["" if hidden else _label_text(v) for v in clip.two]
        culture = ["" if hidden else _label_text(v) for v in clip.culture]
        rows["data_info.csv"].append(head + ["" if hidden else clip.country] + high + two + culture)
        rows["high_info.csv"].append(head + high)
        rows["two_info.csv"].append(head + two)
        rows["culture_info.csv"].append(head + culture)
        rows["type_info.csv"].append(head + ["" if hidden else clip.voc_type])
    return {name: _csv_text(headers[name], rows[name]) for name in headers}


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix a generated corpus into a folder holding something else (unless told to)."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise SynthError(f"{out}: directory is not empty and is not a synth corpus (no {MARKER}); "
                         "pass --overwrite to write into it anyway")


def synthesize_corpus(out: Path, clips: int, seed: int, min_seconds: float = 0.5, max_seconds: float = 10.0,
                      sample_rate: int = 16000, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a generated corpus in the official A-VB layout to `out` and return `out`.

    Deterministic: the same arguments give byte-identical files. Each clip draws from its own random stream
    (seed, clip index), so its content does not depend on how many clips come after it.
    """
    cfg = SynthConfig(clips=int(clips), seed=int(seed), min_seconds=float(min_seconds),
                      max_seconds=float(max_seconds), sample_rate=int(sample_rate))
    cfg.validate()
    out = Path(out)
    _prepare_output(out, overwrite)
    own = (out / MARKER).is_file()
    out.mkdir(parents=True, exist_ok=True)
    # The marker goes first: a crashed run still leaves a folder that a rerun may replace without --overwrite.
    write_json_atomic(out / MARKER, asdict(cfg))
    if own:   # an earlier `--layout described` corpus here must not be read instead of this one
        _remove_layout_files(out, "described")

    splits, types = assign_splits_and_types(cfg.clips, np.random.default_rng(np.random.SeedSequence(cfg.seed)))
    width = max(5, len(str(cfg.clips)))
    wav_dir = out / "audio" / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    made: list[Clip] = []
    for i in tqdm(range(cfg.clips), desc="synth", unit="clip", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, i)))
        clip = make_clip(f"{i + 1:0{width}d}", splits[i], types[i], cfg, rng)
        write_wav(wav_dir / f"{clip.clip_id}.wav", np.clip(render_audio(clip, cfg.sample_rate, rng), -1.0, 1.0),
                  cfg.sample_rate, "PCM_16")
        made.append(clip)

    # A previous, larger corpus in the same folder must not leave orphan clips behind.
    keep = {f"{c.clip_id}.wav" for c in made}
    for stale in wav_dir.glob("*.wav"):
        if stale.name not in keep and re.fullmatch(r"\d+\.wav", stale.name):
            stale.unlink()
    for name, text in label_tables(made).items():
        write_text_atomic(out / "labels" / name, text)
    return out


def summary_line(out: Path) -> str:
    """One line describing a corpus just written (split sizes and total audio), either layout."""
    out = Path(out)
    if _marker_layout(out) == "described":
        return _described_summary_line(out)
    counts = {s: 0 for s in SPLITS}
    with open(out / "labels" / "type_info.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            counts[row["Split"]] += 1
    seconds = 0.0
    for wav in (out / "audio" / "wav").glob("*.wav"):
        rate, data = wavfile.read(wav, mmap=True)
        seconds += len(data) / rate
    parts = ", ".join(f"{s} {counts[s]}" for s in SPLITS)
    return f"wrote {sum(counts.values())} clips ({parts}; {seconds:.1f} s of audio) to {out}"


# ---------------------------------------------------------------------------------------------------------------
# `--layout described`: a corpus described by a corpus.yaml (one labels.csv, one audio folder, speakers).
#
# Each clip's emotion picks a sound recipe and the mean of its latent factors; the factors then shape the
# sound exactly as above (activation -> loudness, pitch, pulse rate; pleasantness -> brightness, pitch
# direction) and the labels: intensity is `strong` when activation (plus noise) is high, valence and arousal
# are noisy linear functions of pleasantness and activation on a 1..9 scale. A speaker shifts the pitch and
# brightness of every clip it utters; speakers are split-disjoint, so the splits test speaker independence.

DESCRIBED_NAME = "synth-described"
DESCRIBED_SPEC = "corpus.yaml"
DESCRIBED_LABELS = "labels.csv"
DESCRIBED_AUDIO = "audio"
DESCRIBED_COLUMNS = ("id", "split", "speaker", "emotion", "intensity", "valence", "arousal")
DESCRIBED_EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
INTENSITIES = ("normal", "strong")
DESCRIBED_TASKS = ("emotion", "intensity", "affect")
AUDIO_FORMATS = ("flac", "wav")
LAYOUTS = ("avb", "described")

# Each emotion sounds like one vocal-burst recipe, moved by the latent factors around its own mean.
EMOTION_RECIPE = {"neutral": "Grunt", "happy": "Laugh", "sad": "Cry", "angry": "Scream", "fearful": "Pant",
                  "disgust": "Groan", "surprised": "Gasp"}
EMOTION_LATENT_MEAN: dict[str, tuple[float, float, float, float]] = {   # activation, pleasantness, rough, tense
    "neutral": (-0.5, 0.0, 0.0, -0.3), "happy": (0.6, 1.2, 0.0, -0.4), "sad": (-0.6, -1.0, 0.1, 0.5),
    "angry": (1.2, -1.0, 0.6, 0.8), "fearful": (0.8, -0.8, 0.3, 0.9), "disgust": (-0.2, -0.9, 0.5, 0.3),
    "surprised": (0.9, 0.3, 0.2, 0.2),
}
EMOTION_FLIP = 0.05        # share of clips whose emotion label is another class (rater disagreement)
INTENSITY_THRESHOLD = 0.3  # activation (+ noise) above which a clip is `strong`
INTENSITY_NOISE = 0.3
AFFECT_CENTRE, AFFECT_SLOPE, AFFECT_NOISE = 5.0, 1.2, 0.4   # rating = 5 + 1.2 * factor + noise, on 1..9
AFFECT_RANGE = (1.0, 9.0)
SPEAKER_PITCH_SIGMA = 0.25  # octaves
SPEAKER_TILT_SIGMA = 0.15
_DESCRIBED_TASK_SPECS = {
    "emotion": ("classification", ("emotion",), DESCRIBED_EMOTIONS),
    "intensity": ("classification", ("intensity",), INTENSITIES),
    "affect": ("regression", ("valence", "arousal"), ()),
}


def parse_described_tasks(tasks: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'emotion,affect' (or a sequence) -> the tasks the corpus.yaml describes, in that (chain) order."""
    parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = tuple(str(p).strip().lower() for p in parts if str(p).strip())
    unknown = [n for n in names if n not in DESCRIBED_TASKS]
    if unknown:
        raise SynthError(f"--tasks: unknown task {unknown[0]!r}; expected some of {', '.join(DESCRIBED_TASKS)}")
    if not names:
        raise SynthError(f"--tasks names no task; expected some of {', '.join(DESCRIBED_TASKS)}")
    if len(set(names)) != len(names):
        raise SynthError(f"--tasks names a task twice: {','.join(names)}")
    return names


@dataclass(frozen=True)
class DescribedConfig:
    """The settings of one generated described corpus (written to synth_config.json)."""

    clips: int
    seed: int
    speakers: int = 8
    tasks: tuple[str, ...] = DESCRIBED_TASKS
    audio_format: str = "flac"
    min_seconds: float = 0.5
    max_seconds: float = 10.0
    sample_rate: int = 16000
    layout: str = "described"
    generator: str = "extract.synth described v1"
    emotions: tuple[str, ...] = DESCRIBED_EMOTIONS

    def validate(self) -> None:
        SynthConfig(self.clips, self.seed, self.min_seconds, self.max_seconds, self.sample_rate).validate()
        if self.speakers < 3:
            raise SynthError(f"--speakers must be at least 3 (one per split), got {self.speakers}")
        if self.speakers > self.clips:
            raise SynthError(f"--speakers {self.speakers} is more than --clips {self.clips}; every speaker "
                             "needs a clip")
        if self.audio_format not in AUDIO_FORMATS:
            raise SynthError(f"--audio-format must be one of {', '.join(AUDIO_FORMATS)}, got {self.audio_format!r}")
        parse_described_tasks(self.tasks)


@dataclass(frozen=True)
class DescribedClip:
    """One clip of a described corpus: its row of labels.csv and the hidden causes its audio is rendered from."""

    clip_id: str
    split: str
    speaker: str
    emotion: str        # the label (after rater disagreement)
    sound: str          # the emotion the audio is rendered from
    intensity: str
    valence: float
    arousal: float
    seconds: float
    latent: np.ndarray  # [4]


def assign_speakers(clips: int, speakers: int, rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """Speaker names, each clip's speaker (every speaker gets clips, near-equally) and each clip's split; a
    speaker belongs to one split (a quarter of them to Val, a quarter to Test, the rest to Train)."""
    width = max(2, len(str(speakers)))
    names = [f"spk{s + 1:0{width}d}" for s in range(speakers)]
    n_held = max(1, round(speakers / 4))
    order = rng.permutation(speakers)
    speaker_split = {}
    for rank, s in enumerate(order):
        speaker_split[int(s)] = "Test" if rank < n_held else "Val" if rank < 2 * n_held else "Train"
    of_clip = rng.permutation(np.arange(clips) % speakers)
    return names, [names[s] for s in of_clip], [speaker_split[int(s)] for s in of_clip]


def assign_emotions(splits: list[str], rng: np.random.Generator) -> list[str]:
    """Near-uniform emotions; every split with at least 7 clips holds each emotion (so its UAR is defined)."""
    split_arr = np.array(splits, dtype=object)
    emotions = rng.choice(len(DESCRIBED_EMOTIONS), size=len(splits))
    for split in SPLITS:
        members = np.flatnonzero(split_arr == split)
        if len(members) >= len(DESCRIBED_EMOTIONS):
            chosen = rng.choice(members, size=len(DESCRIBED_EMOTIONS), replace=False)
            emotions[chosen] = rng.permutation(len(DESCRIBED_EMOTIONS))
    return [DESCRIBED_EMOTIONS[e] for e in emotions]


def make_described_clip(clip_id: str, split: str, speaker: str, emotion: str, cfg: DescribedConfig,
                        rng: np.random.Generator) -> DescribedClip:
    """Draw a described clip's hidden causes and the labels they imply."""
    length = RECIPES[EMOTION_RECIPE[emotion]].length
    seconds = DURATION_MEDIAN * length * math.exp(DURATION_SIGMA * rng.standard_normal())
    seconds = float(np.clip(seconds, cfg.min_seconds, cfg.max_seconds))
    z = np.asarray(EMOTION_LATENT_MEAN[emotion]) + rng.standard_normal(len(LATENTS))
    label = emotion
    if rng.uniform() < EMOTION_FLIP:
        others = [e for e in DESCRIBED_EMOTIONS if e != emotion]
        label = others[int(rng.integers(len(others)))]
    strong = z[0] + INTENSITY_NOISE * rng.standard_normal() > INTENSITY_THRESHOLD
    low, high = AFFECT_RANGE
    valence = float(np.clip(AFFECT_CENTRE + AFFECT_SLOPE * z[1] + AFFECT_NOISE * rng.standard_normal(), low, high))
    arousal = float(np.clip(AFFECT_CENTRE + AFFECT_SLOPE * z[0] + AFFECT_NOISE * rng.standard_normal(), low, high))
    return DescribedClip(clip_id, split, speaker, label, emotion, INTENSITIES[int(strong)], valence, arousal,
                         seconds, z)


def speaker_voice(seed: int, index: int) -> tuple[float, float]:
    """A speaker's pitch factor and spectral-tilt offset (fixed by the seed and the speaker's index)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, index)))
    pitch = float(np.clip(2.0 ** (SPEAKER_PITCH_SIGMA * rng.standard_normal()), 0.7, 1.4))
    tilt = float(np.clip(SPEAKER_TILT_SIGMA * rng.standard_normal(), -0.3, 0.3))
    return pitch, tilt


def render_described(clip: DescribedClip, voice: tuple[float, float], sample_rate: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The clip's waveform: its emotion's recipe in its speaker's voice, moved by its latent factors."""
    base = RECIPES[EMOTION_RECIPE[clip.sound]]
    recipe = replace(base, f0=base.f0 * voice[0], tilt=max(0.3, base.tilt + voice[1]))
    empty = np.zeros(0)
    shell = Clip(clip.clip_id, clip.split, EMOTION_RECIPE[clip.sound], "", clip.seconds, clip.latent, empty,
                 empty, empty)
    return np.clip(render_audio(shell, sample_rate, rng, recipe=recipe), -1.0, 1.0)


def _soundfile() -> Any:
    """soundfile, which only FLAC needs (imported on demand), or a one-line error saying what to do."""
    try:
        import soundfile
    except ImportError:
        raise SynthError("--audio-format flac needs the soundfile package (pip install soundfile); "
                         "or pass --audio-format wav") from None
    return soundfile


def write_flac(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """Write `wave` (float in [-1, 1]) atomically as 16-bit FLAC (rounded like write_wav's PCM_16)."""
    soundfile = _soundfile()
    pcm = np.clip(np.round(np.asarray(wave, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)
    with atomic_path(path, suffix=".flac") as tmp:
        soundfile.write(tmp, pcm, sample_rate, format="FLAC", subtype="PCM_16")


def described_yaml(tasks: tuple[str, ...]) -> str:
    """The corpus.yaml text (written by hand: flow lists keep each task on one line, no yaml needed)."""
    lines = [
        "# Generated by `avb synth --layout described` (extract.synth); the settings are in synth_config.json.",
        f"name: {DESCRIBED_NAME}",
        f"audio: {DESCRIBED_AUDIO}",
        f"labels: {DESCRIBED_LABELS}",
        "id: id",
        "split: split",
        "group: speaker",
        "tasks:",
    ]
    for name in tasks:
        kind, columns, classes = _DESCRIBED_TASK_SPECS[name]
        entry = f"  {name}: {{kind: {kind}, columns: [{', '.join(columns)}]"
        if classes:
            entry += f", classes: [{', '.join(classes)}]"
        lines.append(entry + "}")
    return "\n".join(lines) + "\n"


def described_table(clips: list[DescribedClip]) -> str:
    """The text of labels.csv (Test rows: id, split and speaker only, every label cell empty)."""
    rows = []
    for clip in clips:
        hidden = clip.split == "Test"
        labels = [clip.emotion, clip.intensity, _label_text(clip.valence), _label_text(clip.arousal)]
        rows.append([clip.clip_id, clip.split, clip.speaker] + (["", "", "", ""] if hidden else labels))
    return _csv_text(DESCRIBED_COLUMNS, rows)


_CLIP_FILE = re.compile(r"\d+\.(flac|wav)")


def _remove_layout_files(out: Path, layout: str) -> None:
    """Remove the files an earlier synth run of the other `layout` left in our own folder (generated names
    only), so a reader never finds that corpus instead of the new one."""
    if layout == "described":
        for name in (DESCRIBED_SPEC, DESCRIBED_LABELS):
            (out / name).unlink(missing_ok=True)
        audio = out / DESCRIBED_AUDIO
        if audio.is_dir():
            for stale in audio.iterdir():
                if stale.is_file() and _CLIP_FILE.fullmatch(stale.name):
                    stale.unlink()
    else:
        for name in LABEL_FILES:
            (out / "labels" / name).unlink(missing_ok=True)
        wav_dir = out / "audio" / "wav"
        if wav_dir.is_dir():
            for stale in wav_dir.glob("*.wav"):
                if re.fullmatch(r"\d+\.wav", stale.name):
                    stale.unlink()
        for folder in (wav_dir, out / "labels"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _marker_layout(out: Path) -> str:
    """The layout synth_config.json records ('avb' for a marker from before layouts, or none)."""
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "avb"
    return str(data.get("layout", "avb")) if isinstance(data, dict) else "avb"


def synthesize_described(out: Path, clips: int, seed: int, min_seconds: float = 0.5, max_seconds: float = 10.0,
                         sample_rate: int = 16000, *, speakers: int = 8, audio_format: str = "flac",
                         tasks: str | tuple[str, ...] = ",".join(DESCRIBED_TASKS), overwrite: bool = False,
                         progress: bool = True) -> Path:
    """Write a generated corpus described by a corpus.yaml to `out` and return `out`.

    `out/corpus.yaml` describes `tasks` (a subset of emotion, intensity, affect, in chain order);
    `out/labels.csv` holds every column whatever `tasks` says; `out/audio/<id>.<audio_format>` the clips.
    Deterministic like `synthesize_corpus`: the same arguments give byte-identical files.
    """
    cfg = DescribedConfig(clips=int(clips), seed=int(seed), speakers=int(speakers),
                          tasks=parse_described_tasks(tasks), audio_format=str(audio_format).lower(),
                          min_seconds=float(min_seconds), max_seconds=float(max_seconds),
                          sample_rate=int(sample_rate))
    cfg.validate()
    if cfg.audio_format == "flac":
        _soundfile()   # before anything is written
    out = Path(out)
    _prepare_output(out, overwrite)
    own = (out / MARKER).is_file()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, asdict(cfg))
    if own:   # an earlier A-VB-layout corpus here must not be read instead of this one
        _remove_layout_files(out, "avb")

    plan = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(4,)))
    names, speaker_of, splits = assign_speakers(cfg.clips, cfg.speakers, plan)
    emotions = assign_emotions(splits, plan)
    voices = {name: speaker_voice(cfg.seed, i) for i, name in enumerate(names)}
    width = max(5, len(str(cfg.clips)))
    audio_dir = out / DESCRIBED_AUDIO
    audio_dir.mkdir(parents=True, exist_ok=True)
    made: list[DescribedClip] = []
    for i in tqdm(range(cfg.clips), desc="synth", unit="clip", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, i)))
        clip = make_described_clip(f"{i + 1:0{width}d}", splits[i], speaker_of[i], emotions[i], cfg, rng)
        wave = render_described(clip, voices[clip.speaker], cfg.sample_rate, rng)
        path = audio_dir / f"{clip.clip_id}.{cfg.audio_format}"
        if cfg.audio_format == "flac":
            write_flac(path, wave, cfg.sample_rate)
        else:
            write_wav(path, wave, cfg.sample_rate, "PCM_16")
        made.append(clip)

    # A previous corpus in the same folder (larger, or in the other format) must not leave clips behind.
    keep = {f"{c.clip_id}.{cfg.audio_format}" for c in made}
    for stale in audio_dir.iterdir():
        if stale.name not in keep and stale.is_file() and _CLIP_FILE.fullmatch(stale.name):
            stale.unlink()
    write_text_atomic(out / DESCRIBED_LABELS, described_table(made))
    write_text_atomic(out / DESCRIBED_SPEC, described_yaml(cfg.tasks))
    return out


def _audio_seconds(path: Path) -> float:
    if path.suffix == ".wav":
        rate, data = wavfile.read(path, mmap=True)
        return len(data) / rate
    info = _soundfile().info(str(path))
    return info.frames / info.samplerate


def _described_summary_line(out: Path) -> str:
    counts = {s: 0 for s in SPLITS}
    speakers: set[str] = set()
    seconds = 0.0
    ext = json.loads((out / MARKER).read_text(encoding="utf-8")).get("audio_format", "flac")
    with open(out / DESCRIBED_LABELS, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            counts[row["split"]] += 1
            speakers.add(row["speaker"])
            seconds += _audio_seconds(out / DESCRIBED_AUDIO / f"{row['id']}.{ext}")
    parts = ", ".join(f"{s} {counts[s]}" for s in SPLITS)
    return (f"wrote {sum(counts.values())} clips ({parts}; {len(speakers)} speakers; {seconds:.1f} s of audio) "
            f"to {out}")


_DEFAULTS = inspect.signature(synthesize_corpus).parameters   # the CLI's defaults are the function's
_DESCRIBED_DEFAULTS = inspect.signature(synthesize_described).parameters


@click.command("synth", cls=OptionOrArgumentCommand)
@option_or_argument("--out", "out", "OUT", type=click.Path(file_okay=False, path_type=Path),
                    help="Folder the corpus is written to (avb: labels/ and audio/wav/; described: corpus.yaml, "
                         "labels.csv and audio/).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="avb", show_default=True,
              help="avb: the official A-VB layout; described: a corpus.yaml corpus with speakers and "
                   "emotion / intensity / affect tasks.")
@click.option("--clips", type=int, default=300, show_default=True,
              help="Number of clips (avb: ~1/3 per split; described: split by speaker).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed -> byte-identical corpus.")
@click.option("--min-seconds", type=float, default=_DEFAULTS["min_seconds"].default, show_default=True,
              help="Shortest clip.")
@click.option("--max-seconds", type=float, default=_DEFAULTS["max_seconds"].default, show_default=True,
              help="Longest clip.")
@click.option("--sample-rate", type=int, default=_DEFAULTS["sample_rate"].default, show_default=True,
              help="Audio sample rate in Hz.")
@click.option("--speakers", type=int, default=None,
              help="described only: number of speakers, each in one split "
                   f"[default: {_DESCRIBED_DEFAULTS['speakers'].default}].")
@click.option("--tasks", "tasks", default=None,
              help=f"described only: the tasks corpus.yaml describes, in chain order "
                   f"[default: {_DESCRIBED_DEFAULTS['tasks'].default}].")
@click.option("--audio-format", type=click.Choice(AUDIO_FORMATS), default=None,
              help=f"described only: audio file format [default: {_DESCRIBED_DEFAULTS['audio_format'].default}].")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that is not a synth corpus.")
@progress_option("Show a progress bar.")
def synth_command(out: Path, layout: str, clips: int, seed: int, min_seconds: float, max_seconds: float,
                  sample_rate: int, speakers: int | None, tasks: str | None, audio_format: str | None,
                  overwrite: bool, progress: bool) -> None:
    """Write a generated corpus to --out: the official A-VB layout (default) or, with --layout described, a
    corpus.yaml corpus (labels.csv: id, split, speaker, emotion, intensity, valence, arousal; audio/<id>.flac).

    Every clip's sound is rendered from the same hidden factors as its labels (type recipe; activation ->
    loudness, pitch, pulse rate; pleasantness -> brightness, pitch direction), so models can learn all the
    tasks from it. Test rows have empty label cells, as in the real corpus.
    """
    with command_errors():
        if layout == "avb":
            given = [flag for flag, value in (("--speakers", speakers), ("--tasks", tasks),
                                              ("--audio-format", audio_format)) if value is not None]
            if given:
                raise SynthError(f"{given[0]} applies only to --layout described")
            path = synthesize_corpus(out, clips, seed, min_seconds, max_seconds, sample_rate,
                                     overwrite=overwrite, progress=progress)
        else:
            extra = {k: v for k, v in (("speakers", speakers), ("tasks", tasks), ("audio_format", audio_format))
                     if v is not None}
            path = synthesize_described(out, clips, seed, min_seconds, max_seconds, sample_rate,
                                        overwrite=overwrite, progress=progress, **extra)
        click.echo(summary_line(path))
