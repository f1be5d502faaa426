"""`avb synth`: official layout, exact headers, hidden Test labels, determinism, and audio that carries labels."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import wavfile
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from extract.app.cli import main
from extract.synth import (
    COUNTRY_BIAS,
    LABEL_FILES,
    MARKER,
    SynthConfig,
    SynthError,
    assign_splits_and_types,
    make_clip,
    synthesize_corpus,
)
from heads.tasks import AVB, COUNTRIES, EMOTIONS, SPLITS, TYPE_CLASSES

EXPECTED_HEADERS = {
    "data_info.csv": ["File_ID", "Split", "Country", *AVB["high"].columns, *AVB["two"].columns,
                      *AVB["culture"].columns],
    "high_info.csv": ["File_ID", "Split", *AVB["high"].columns],
    "two_info.csv": ["File_ID", "Split", *AVB["two"].columns],
    "culture_info.csv": ["File_ID", "Split", *AVB["culture"].columns],
    "type_info.csv": ["File_ID", "Split", *AVB["type"].columns],
}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_corpus(tmp_path_factory.mktemp("synth") / "c", clips=48, seed=7, max_seconds=3.0,
                             progress=False)


def test_layout_and_exact_headers(corpus: Path) -> None:
    assert sorted(p.name for p in (corpus / "labels").iterdir()) == sorted(LABEL_FILES)
    for name, expected in EXPECTED_HEADERS.items():
        header, rows = read_csv(corpus / "labels" / name)
        assert header == expected, name
        assert len(rows) == 48
    # The spelled-out official Culture order: Surprise columns last, spaces inside country names.
    culture = EXPECTED_HEADERS["culture_info.csv"]
    assert culture[2:4] == ["China_Awe", "China_Excitement"]
    assert culture[-4:] == ["China_Surprise", "United States_Surprise", "South Africa_Surprise",
                            "Venezuela_Surprise"]
    assert len(EXPECTED_HEADERS["data_info.csv"]) == 3 + 10 + 2 + 40


def test_bracketed_ids_and_one_wav_per_id(corpus: Path) -> None:
    ids = [r["File_ID"] for r in read_csv(corpus / "labels" / "data_info.csv")[1]]
    assert ids == [f"[{i:05d}]" for i in range(1, 49)]
    for name in LABEL_FILES:
        assert [r["File_ID"] for r in read_csv(corpus / "labels" / name)[1]] == ids, name
    wavs = sorted(p.name for p in (corpus / "audio" / "wav").iterdir())
    assert wavs == sorted(f"{i[1:-1]}.wav" for i in ids)
    for wav in wavs:
        rate, data = wavfile.read(corpus / "audio" / "wav" / wav)
        assert rate == 16000 and data.dtype == np.int16 and data.ndim == 1
        assert 0.5 * rate - 1 <= len(data) <= 3.0 * rate + 1
        assert np.abs(data).max() > 0


def test_splits_types_and_hidden_test_labels(corpus: Path) -> None:
    _, rows = read_csv(corpus / "labels" / "data_info.csv")
    _, types = read_csv(corpus / "labels" / "type_info.csv")
    assert [sum(r["Split"] == s for r in rows) for s in SPLITS] == [16, 16, 16]
    for split in ("Train", "Val"):
        assert {t["Voc_Type"] for t in types if t["Split"] == split} == set(TYPE_CLASSES)
    for row, typ in zip(rows, types):
        label_cells = [row[c] for c in EXPECTED_HEADERS["data_info.csv"][2:]] + [typ["Voc_Type"]]
        if row["Split"] == "Test":
            assert all(cell == "" for cell in label_cells), row["File_ID"]
        else:
            assert all(cell != "" for cell in label_cells), row["File_ID"]
            assert row["Country"] in COUNTRIES


def test_label_ranges_max_normalisation_and_file_agreement(corpus: Path) -> None:
    _, rows = read_csv(corpus / "labels" / "data_info.csv")
    labelled = [r for r in rows if r["Split"] != "Test"]
    high = np.array([[float(r[c]) for c in AVB["high"].columns] for r in labelled])
    two = np.array([[float(r[c]) for c in AVB["two"].columns] for r in labelled])
    culture = np.array([[float(r[c]) for c in AVB["culture"].columns] for r in labelled])
    for values in (high, two, culture):
        assert values.min() >= 0.0 and values.max() <= 1.0
    np.testing.assert_array_equal(high.max(axis=1), 1.0)
    assert high.std(axis=0).min() > 0.02 and two.std(axis=0).min() > 0.05  # labels vary between clips
    # Each culture column is its High emotion shifted by that country's bias plus small noise.
    for j, column in enumerate(AVB["culture"].columns):
        country, emotion = column.rsplit("_", 1)
        expected = np.clip(high[:, EMOTIONS.index(emotion)]
                           + COUNTRY_BIAS[COUNTRIES.index(country), EMOTIONS.index(emotion)], 0, 1)
        assert np.abs(culture[:, j] - expected).mean() < 0.06, column
    # The task files carry exactly data_info's cells.
    for name in ("high_info.csv", "two_info.csv", "culture_info.csv"):
        header, task_rows = read_csv(corpus / "labels" / name)
        for row, task_row in zip(rows, task_rows):
            assert all(row[c] == task_row[c] for c in header), (name, row["File_ID"])


def test_durations_spread_like_the_real_corpus() -> None:
    cfg = SynthConfig(clips=3000, seed=0)
    splits, types = assign_splits_and_types(cfg.clips, np.random.default_rng(0))
    seconds = np.array([make_clip("x", s, t, cfg, np.random.default_rng(i)).seconds
                        for i, (s, t) in enumerate(zip(splits, types))])
    assert seconds.min() == 0.5 and seconds.max() == 10.0          # clipped to [min, max]
    assert 1.9 < seconds.mean() < 2.6                              # HUME-VB: mean 2.24 s
    assert np.median(seconds) < seconds.mean()                     # right-skewed like the real data
    counts = {t: types.count(t) for t in TYPE_CLASSES}
    assert counts["Gasp"] == max(counts.values()) and counts["Pant"] == min(counts.values())


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(clips=12, max_seconds=1.0, sample_rate=8000, progress=False)
    a = tree_bytes(synthesize_corpus(tmp_path / "a", seed=3, **kwargs))
    b = tree_bytes(synthesize_corpus(tmp_path / "b", seed=3, **kwargs))
    c = tree_bytes(synthesize_corpus(tmp_path / "c", seed=4, **kwargs))
    assert a == b
    assert a.keys() == c.keys()
    assert a["labels/data_info.csv"] != c["labels/data_info.csv"]
    assert a["audio/wav/00001.wav"] != c["audio/wav/00001.wav"]
    assert wavfile.read(tmp_path / "a" / "audio" / "wav" / "00001.wav")[0] == 8000


def test_refuses_foreign_directory_and_rewrites_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match=re.escape(
            f"{foreign}: directory is not empty and is not a synth corpus (no {MARKER}); "
            "pass --overwrite to write into it anyway")):
        synthesize_corpus(foreign, clips=3, seed=0, max_seconds=0.6, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    synthesize_corpus(foreign, clips=3, seed=0, max_seconds=0.6, progress=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    own = synthesize_corpus(tmp_path / "own", clips=9, seed=0, max_seconds=0.6, progress=False)
    synthesize_corpus(own, clips=4, seed=1, max_seconds=0.6, progress=False)  # no --overwrite needed
    assert sorted(p.name for p in (own / "audio" / "wav").iterdir()) == [f"0000{i}.wav" for i in range(1, 5)]
    assert len(read_csv(own / "labels" / "type_info.csv")[1]) == 4

    with pytest.raises(SynthError, match=r"^--clips must be at least 3 \(one per split\), got 2$"):
        synthesize_corpus(tmp_path / "x", clips=2, seed=0)
    with pytest.raises(SynthError, match=r"^need 0 < --min-seconds <= --max-seconds, got 2.0 and 1.0$"):
        synthesize_corpus(tmp_path / "x", clips=3, seed=0, min_seconds=2.0, max_seconds=1.0)


def test_cli_writes_corpus_and_reports_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(main, ["synth", str(out), "--clips", "6", "--seed", "2", "--max-seconds", "0.8",
                                  "--sample-rate", "44100", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 6 clips (Train 2, Val 2, Test 2; ")
    assert result.output.rstrip().endswith(f"s of audio) to {out}")
    assert wavfile.read(out / "audio" / "wav" / "00006.wav")[0] == 44100

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    result = runner.invoke(main, ["synth", str(tmp_path / "busy"), "--clips", "3", "--quiet"])
    assert result.exit_code != 0
    assert "Error: " in result.output and "pass --overwrite" in result.output


# ---------------------------------------------------------------------------------------------------------------
# Learnability: simple acoustic features + linear models recover type, arousal and valence on Val.

def acoustic_features(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Log energy, zero-crossing rate, spectral centroid and its change over the clip, band energies,
    spectral flatness, envelope modulation at 1.5-3.5 Hz and 3.5-7.5 Hz, duration."""
    x = pcm.astype(np.float64) / 32768.0
    frame, hop = int(0.032 * rate), int(0.016 * rate)
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    starts = hop * np.arange(1 + (len(x) - frame) // hop)
    power = np.abs(np.fft.rfft(x[starts[:, None] + np.arange(frame)] * np.hanning(frame), axis=1)) ** 2
    freqs = np.fft.rfftfreq(frame, 1 / rate)
    energy = power.sum(1) + 1e-12
    weight = energy / energy.sum()
    centroid = (power * freqs).sum(1) / energy
    half = len(centroid) // 2
    rise = (np.log1p((centroid[half:] * weight[half:]).sum() / (weight[half:].sum() + 1e-12))
            - np.log1p((centroid[:half] * weight[:half]).sum() / (weight[:half].sum() + 1e-12)))
    spectrum = power.sum(0) + 1e-12
    edges = [0, 200, 400, 800, 1600, 3200, rate / 2]
    bands = [np.log(spectrum[(freqs >= lo) & (freqs < hi)].sum() / spectrum.sum()) for lo, hi in
             zip(edges[:-1], edges[1:])]
    flatness = np.exp(np.log(spectrum).mean()) / spectrum.mean()
    envelope = np.sqrt(energy) - np.sqrt(energy).mean()
    n_fft = max(256, len(envelope))
    mod = np.abs(np.fft.rfft(envelope, n=n_fft)) ** 2
    mod_freqs = np.fft.rfftfreq(n_fft, hop / rate)
    modulation = [mod[(mod_freqs >= lo) & (mod_freqs < hi)].sum() / (mod.sum() + 1e-12)
                  for lo, hi in ((1.5, 3.5), (3.5, 7.5))]
    zcr = np.mean(np.diff(np.signbit(x)) != 0)
    return np.array([0.5 * np.log(np.mean(x ** 2) + 1e-12), zcr, np.log1p((centroid * weight).sum()), rise,
                     *bands, np.log(flatness), *modulation, np.log(len(pcm) / rate), np.log(energy).std()])


def ccc(a: np.ndarray, b: np.ndarray) -> float:
    """Concordance correlation coefficient, population moments (written out, independent of heads.metrics)."""
    cov = np.mean((a - a.mean()) * (b - b.mean()))
    return float(2 * cov / (a.var() + b.var() + (a.mean() - b.mean()) ** 2))


def test_audio_carries_type_arousal_and_valence(tmp_path: Path) -> None:
    root = synthesize_corpus(tmp_path / "learn", clips=210, seed=11, max_seconds=3.0, progress=False)
    _, types = read_csv(root / "labels" / "type_info.csv")
    _, two = read_csv(root / "labels" / "two_info.csv")
    feats = []
    for row in types:
        rate, pcm = wavfile.read(root / "audio" / "wav" / f"{row['File_ID'][1:-1]}.wav")
        feats.append(acoustic_features(pcm, rate))
    feats = np.array(feats)
    split = np.array([r["Split"] for r in types])
    train, val = split == "Train", split == "Val"
    y = np.array([TYPE_CLASSES.index(r["Voc_Type"]) if r["Voc_Type"] else -1 for r in types])
    va = np.array([[float(r["Valence"] or "nan"), float(r["Arousal"] or "nan")] for r in two])

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats[train], y[train])
    pred = clf.predict(feats[val])
    recalls = [np.mean(pred[y[val] == k] == k) for k in range(len(TYPE_CLASSES)) if np.any(y[val] == k)]
    assert len(recalls) == 8
    assert np.mean(recalls) > 0.5  # chance is 0.125

    reg = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(feats[train], va[train])
    fit = reg.predict(feats[val])
    assert ccc(va[val, 0], fit[:, 0]) > 0.3  # valence
    assert ccc(va[val, 1], fit[:, 1]) > 0.5  # arousal


def test_round_trip_through_corpus_reader_and_audio_loader(corpus: Path, tmp_path: Path) -> None:
    """The project's own reader and loader accept the generated corpus and see the same labels."""
    corpus_mod = pytest.importorskip("extract.corpus")
    audio_mod = pytest.importorskip("extract.audio")
    read = corpus_mod.read_corpus(corpus, check_audio=True)
    _, rows = read_csv(corpus / "labels" / "data_info.csv")
    _, types = read_csv(corpus / "labels" / "type_info.csv")
    assert read.ids == [f"{i:05d}" for i in range(1, 49)]
    assert list(read.splits) == [r["Split"] for r in rows]
    assert read.countries == [r["Country"] for r in rows]
    labelled = np.array([r["Split"] != "Test" for r in rows])
    expected_type = [TYPE_CLASSES.index(t["Voc_Type"]) for t in types if t["Voc_Type"]]
    np.testing.assert_array_equal(read.labels["type"][labelled, 0], expected_type)
    expected_culture = np.array([[float(r[c]) for c in AVB["culture"].columns] for r in rows if r["Split"] != "Test"])
    np.testing.assert_allclose(read.labels["culture"][labelled], expected_culture, atol=1e-6)
    assert np.isnan(read.labels["high"][~labelled]).all() and np.isnan(read.labels["two"][~labelled]).all()

    small = synthesize_corpus(tmp_path / "sr8k", clips=3, seed=1, max_seconds=1.0, sample_rate=8000,
                              progress=False)
    rate, pcm = wavfile.read(small / "audio" / "wav" / "00001.wav")
    wave = audio_mod.load_audio(small / "audio" / "wav" / "00001.wav")
    assert rate == 8000 and len(wave) == 2 * len(pcm)  # resampled to 16 kHz
    np.testing.assert_allclose(np.sqrt(np.mean(wave ** 2)), np.sqrt(np.mean((pcm / 32768.0) ** 2)), rtol=0.05)
