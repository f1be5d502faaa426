"""`avb synth --layout described`: corpus.yaml + labels.csv + audio/<id>.flac, speaker-disjoint splits, hidden
Test labels, 1..9 affect ratings, determinism, task subsets, and audio that carries its labels."""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import wavfile

from extract.app.cli import main
from extract.synth import (
    AFFECT_RANGE,
    DESCRIBED_COLUMNS,
    DESCRIBED_EMOTIONS,
    INTENSITIES,
    MARKER,
    SynthError,
    summary_line,
    synthesize_corpus,
    synthesize_described,
)
from heads.tasks import SPLITS

try:
    import soundfile as sf
except ImportError:   # FLAC needs soundfile; without it the same tests run on WAV corpora
    sf = None
FORMATS = ("flac", "wav") if sf is not None else ("wav",)
FORMAT = FORMATS[0]

LABELS = ("emotion", "intensity", "valence", "arousal")


def read_rows(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Float samples in [-1, 1] and the sample rate, through soundfile (FLAC) or scipy (WAV)."""
    if path.suffix == ".flac":
        wave, rate = sf.read(path, dtype="float64")
        return wave, rate
    rate, pcm = wavfile.read(path)
    return pcm / 32768.0, rate


def loudness(wave: np.ndarray, frame: int = 512) -> float:
    """Log RMS over the frames within 10 dB of the loudest one (the sounding part of a burst)."""
    n = max(1, len(wave) // frame)
    energy = (np.pad(wave, (0, max(0, frame - len(wave))))[: n * frame].reshape(n, frame) ** 2).mean(1)
    return float(0.5 * np.log(energy[energy > 0.1 * energy.max()].mean() + 1e-12))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 speakers (4 Train, 2 Val, 2 Test) of 10 clips: 60 labelled clips.
    return synthesize_described(tmp_path_factory.mktemp("described") / "c", clips=80, seed=5, max_seconds=2.5,
                                audio_format=FORMAT, progress=False)


def test_layout_and_corpus_yaml(corpus: Path) -> None:
    yaml = pytest.importorskip("yaml")
    assert sorted(p.name for p in corpus.iterdir()) == ["audio", "corpus.yaml", "labels.csv", MARKER]
    spec = yaml.safe_load((corpus / "corpus.yaml").read_text())
    assert spec == {
        "name": "synth-described", "audio": "audio", "labels": "labels.csv", "id": "id", "split": "split",
        "group": "speaker",
        "tasks": {
            "emotion": {"kind": "classification", "columns": ["emotion"], "classes": list(DESCRIBED_EMOTIONS)},
            "intensity": {"kind": "classification", "columns": ["intensity"], "classes": ["normal", "strong"]},
            "affect": {"kind": "regression", "columns": ["valence", "arousal"]},
        },
    }
    assert list(spec["tasks"]) == ["emotion", "intensity", "affect"]   # the chain order
    header, rows = read_rows(corpus)
    assert header == list(DESCRIBED_COLUMNS)
    assert [r["id"] for r in rows] == [f"{i:05d}" for i in range(1, 81)]
    assert sorted(p.name for p in (corpus / "audio").iterdir()) == [f"{r['id']}.{FORMAT}" for r in rows]


def test_splits_are_speaker_disjoint_and_test_rows_unlabelled(corpus: Path) -> None:
    _, rows = read_rows(corpus)
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["speaker"], set()).add(row["split"])
    assert sorted(split_of) == [f"spk{i:02d}" for i in range(1, 9)]
    assert all(len(s) == 1 for s in split_of.values()), split_of
    per_split = {s: sum(1 for v in split_of.values() if v == {s}) for s in SPLITS}
    assert per_split == {"Train": 4, "Val": 2, "Test": 2}
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    assert counts == {"Train": 40, "Val": 20, "Test": 20}   # every speaker gets 10 of the 80 clips
    for row in rows:
        if row["split"] == "Test":
            assert all(row[c] == "" for c in LABELS), row
        else:
            assert all(row[c] != "" for c in LABELS), row
            assert row["emotion"] in DESCRIBED_EMOTIONS and row["intensity"] in INTENSITIES
    for split in ("Train", "Val"):   # each labelled split holds every class (its UAR is defined)
        labelled = [r for r in rows if r["split"] == split]
        assert {r["emotion"] for r in labelled} == set(DESCRIBED_EMOTIONS)
        assert {r["intensity"] for r in labelled} == set(INTENSITIES)


def test_affect_ratings_are_on_a_one_to_nine_scale(corpus: Path) -> None:
    _, rows = read_rows(corpus)
    values = np.array([[float(r["valence"]), float(r["arousal"])] for r in rows if r["split"] != "Test"])
    low, high = AFFECT_RANGE
    assert values.min() >= low and values.max() <= high
    assert (values > 1.0).mean() > 0.9              # not [0, 1]: regression is not A-VB-shaped
    assert values.std(axis=0).min() > 0.8 and 3.5 < values.mean() < 6.5


def test_audio_decodes_with_the_expected_format_and_durations(corpus: Path) -> None:
    _, rows = read_rows(corpus)
    total = 0.0
    for row in rows:
        path = corpus / "audio" / f"{row['id']}.{FORMAT}"
        if sf is not None:
            info = sf.info(str(path))
            assert (info.format, info.subtype, info.samplerate, info.channels) == (FORMAT.upper(), "PCM_16", 16000,
                                                                                   1)
        wave, rate = read_audio(path)
        assert wave.ndim == 1 and rate == 16000
        assert 0.5 - 1e-3 <= len(wave) / rate <= 2.5 + 1e-3
        assert 0 < np.abs(wave).max() <= 1.0
        total += len(wave) / rate
    assert summary_line(corpus) == (f"wrote 80 clips (Train 40, Val 20, Test 20; 8 speakers; {total:.1f} s of "
                                    f"audio) to {corpus}")


def test_audio_carries_intensity_and_arousal(corpus: Path) -> None:
    _, rows = read_rows(corpus)
    labelled = [r for r in rows if r["split"] != "Test"]
    assert len(labelled) == 60
    level = np.array([loudness(read_audio(corpus / "audio" / f"{r['id']}.{FORMAT}")[0]) for r in labelled])
    arousal = np.array([float(r["arousal"]) for r in labelled])
    strong = np.array([r["intensity"] == "strong" for r in labelled])
    assert np.corrcoef(level, arousal)[0, 1] > 0.5
    assert level[strong].mean() - level[~strong].mean() > 0.4   # strong clips are louder (log RMS)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"clips": 12, "speakers": 4, "max_seconds": 1.0, "sample_rate": 8000, "progress": False}
    for fmt in FORMATS:
        a = tree_bytes(synthesize_described(tmp_path / f"a-{fmt}", seed=3, audio_format=fmt, **kwargs))
        b = tree_bytes(synthesize_described(tmp_path / f"b-{fmt}", seed=3, audio_format=fmt, **kwargs))
        c = tree_bytes(synthesize_described(tmp_path / f"c-{fmt}", seed=4, audio_format=fmt, **kwargs))
        assert a == b
        assert a.keys() == c.keys() and f"audio/00001.{fmt}" in a
        assert a["labels.csv"] != c["labels.csv"] and a[f"audio/00001.{fmt}"] != c[f"audio/00001.{fmt}"]
    if sf is None:
        return
    # Both formats hold the same samples.
    flac, rate = sf.read(tmp_path / "a-flac" / "audio" / "00007.flac", dtype="int16")
    wav_rate, wav = wavfile.read(tmp_path / "a-wav" / "audio" / "00007.wav")
    assert rate == wav_rate == 8000
    np.testing.assert_array_equal(flac, wav)


def test_task_subsets_change_only_the_yaml(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    kwargs = {"clips": 9, "seed": 1, "speakers": 3, "max_seconds": 0.8, "sample_rate": 8000, "progress": False,
              "audio_format": FORMAT}
    full = synthesize_described(tmp_path / "full", **kwargs)
    for tasks, expected in (("emotion", ["emotion"]), ("affect", ["affect"]),
                            ("affect, Emotion", ["affect", "emotion"]), (("intensity",), ["intensity"])):
        root = synthesize_described(tmp_path / "sub", tasks=tasks, **kwargs)
        spec = yaml.safe_load((root / "corpus.yaml").read_text())
        assert list(spec["tasks"]) == expected
        assert (root / "labels.csv").read_bytes() == (full / "labels.csv").read_bytes()   # every column kept
    assert yaml.safe_load((root / "corpus.yaml").read_text())["tasks"] == {
        "intensity": {"kind": "classification", "columns": ["intensity"], "classes": ["normal", "strong"]}}
    for tasks, message in (("emotion,mood", ("--tasks: unknown task 'mood'; expected some of emotion, intensity, "
                                            "affect")),
                           (" , ", "--tasks names no task; expected some of emotion, intensity, affect"),
                           ("affect,affect", "--tasks names a task twice: affect,affect")):
        with pytest.raises(SynthError, match=f"^{re.escape(message)}$"):
            synthesize_described(tmp_path / "bad", tasks=tasks, **kwargs)


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    for kwargs, message in (
        ({"clips": 9, "speakers": 2}, "--speakers must be at least 3 (one per split), got 2"),
        ({"clips": 4, "speakers": 5}, "--speakers 5 is more than --clips 4; every speaker needs a clip"),
        ({"clips": 9, "audio_format": "mp3"}, "--audio-format must be one of flac, wav, got 'mp3'"),
        ({"clips": 2}, "--clips must be at least 3 (one per split), got 2"),
    ):
        with pytest.raises(SynthError, match=f"^{re.escape(message)}$"):
            synthesize_described(tmp_path / "x", seed=0, progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_reruns_replace_their_own_corpus_of_either_layout(tmp_path: Path) -> None:
    small = {"max_seconds": 0.6, "sample_rate": 8000, "progress": False}
    own = synthesize_described(tmp_path / "own", clips=9, seed=0, speakers=3, audio_format=FORMAT, **small)
    synthesize_described(own, clips=4, seed=1, speakers=3, audio_format="wav", **small)   # no --overwrite
    assert sorted(p.name for p in (own / "audio").iterdir()) == [f"0000{i}.wav" for i in range(1, 5)]
    assert len(read_rows(own)[1]) == 4

    synthesize_corpus(own, clips=3, seed=0, **small)        # described -> avb: no stale corpus.yaml
    assert sorted(p.name for p in own.iterdir()) == ["audio", "labels", MARKER]
    assert summary_line(own).startswith("wrote 3 clips (Train 1, Val 1, Test 1; ")
    synthesize_described(own, clips=3, seed=0, speakers=3, audio_format=FORMAT, **small)   # avb -> described
    assert sorted(p.name for p in own.iterdir()) == ["audio", "corpus.yaml", "labels.csv", MARKER]
    assert sorted(p.name for p in (own / "audio").iterdir()) == [f"0000{i}.{FORMAT}" for i in range(1, 4)]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "corpus.yaml").write_text("mine")
    with pytest.raises(SynthError, match="is not a synth corpus"):
        synthesize_described(foreign, clips=3, seed=0, speakers=3, audio_format=FORMAT, **small)
    assert (foreign / "corpus.yaml").read_text() == "mine"


def test_cli_described_layout_and_its_options(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(main, ["synth", "--out", str(out), "--layout", "described", "--clips", "9",
                                  "--speakers", "3", "--tasks", "emotion", "--audio-format", "wav",
                                  "--max-seconds", "0.6", "--quiet"])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"wrote 9 clips \(Train 3, Val 3, Test 3; 3 speakers; [\d.]+ s of audio\) to "
                        rf"{re.escape(str(out))}\n", result.output)
    assert (out / "audio" / "00009.wav").is_file()
    assert "emotion:" in (out / "corpus.yaml").read_text() and "affect" not in (out / "corpus.yaml").read_text()

    for flag, value in (("--tasks", "emotion"), ("--speakers", "4"), ("--audio-format", "flac")):
        result = runner.invoke(main, ["synth", str(tmp_path / "avb"), "--clips", "3", flag, value, "--quiet"])
        assert result.exit_code != 0
        assert result.output.strip() == f"Error: {flag} applies only to --layout described"
    assert not (tmp_path / "avb").exists()

    result = runner.invoke(main, ["synth", str(tmp_path / "avb"), "--clips", "3", "--max-seconds", "0.6",
                                  "--quiet"])   # the default layout is still A-VB's
    assert result.exit_code == 0, result.output
    assert (tmp_path / "avb" / "labels" / "type_info.csv").is_file() and not (tmp_path / "avb" / "corpus.yaml").exists()


def test_the_corpus_reader_reads_it(corpus: Path) -> None:
    description = pytest.importorskip("extract.description")
    read = description.read_described_corpus(corpus / "corpus.yaml", check_audio=True)
    _, rows = read_rows(corpus)
    assert read.ids == [r["id"] for r in rows]
    assert list(read.splits) == [r["split"] for r in rows]
    assert list(read.groups) == [r["speaker"] for r in rows]
    assert read.tasks.names == ("emotion", "intensity", "affect")
    labelled = np.array([r["split"] != "Test" for r in rows])
    expected = [DESCRIBED_EMOTIONS.index(r["emotion"]) for r in rows if r["emotion"]]
    np.testing.assert_array_equal(read.labels["emotion"][labelled, 0], expected)
    np.testing.assert_allclose(read.labels["affect"][labelled],
                               [[float(r["valence"]), float(r["arousal"])] for r in rows if r["valence"]], atol=1e-5)


def test_flac_without_soundfile_is_a_one_line_error_before_writing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "soundfile", None)   # `import soundfile` now raises ImportError
    with pytest.raises(SynthError, match=r"^--audio-format flac needs the soundfile package \(pip install "
                                         r"soundfile\); or pass --audio-format wav$"):
        synthesize_described(tmp_path / "x", clips=3, seed=0, speakers=3, progress=False)
    assert not (tmp_path / "x").exists()
