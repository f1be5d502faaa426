"""`avb corpus init`: a corpus.yaml drafted from a label CSV and an audio folder, which then reads as a corpus."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_csv

from extract.app.cli import main
from extract.audio import write_wav
from extract.description import (
    DescriptionError,
    draft_description,
    read_described_corpus,
    read_description,
)

EMOTIONS = ["angry", "happy", "sad", "calm"]
HEADER = ["row", "file", "Split", "Actor", "Emotion", "Valence (mean)", "intensity", "yes", "notes"]


def make_data(root: Path, n: int = 24) -> tuple[Path, Path, list[list[str]]]:
    """n clips, odd ones 16 kHz WAV, even ones 48 kHz FLAC; a row index, ids, splits in mixed case, six actors,
    four emotions, a real-valued column with an awkward name, 1/2 intensities, a column named 'yes', free notes."""
    import soundfile

    clips = root / "data" / "clips"
    clips.mkdir(parents=True)
    rows = []
    for i in range(n):
        clip = f"03-01-{i:02d}"
        if i % 2:
            write_wav(clips / f"{clip}.wav", np.zeros(1600), 16000)
        else:
            soundfile.write(clips / f"{clip}.flac", np.zeros(3200), 48000, subtype="PCM_16")
        rows.append([str(i), clip, ["train", "VAL", "Test"][i % 3], f"actor{i % 6}", EMOTIONS[i % 4],
                     f"{i / n:.3f}", str(1 + i % 2), ["no", "maybe"][i % 2], f"note {i}"])
    (clips / "03-01-00.txt").write_text("a transcript beside the audio")
    return write_csv(root / "data" / "meta.csv", HEADER, rows), clips, rows


def init(*args):
    return CliRunner().invoke(main, ["corpus", "init", *map(str, args)])


def test_init_drafts_a_description_that_reads_as_the_corpus(tmp_path):
    labels, clips, rows = make_data(tmp_path)
    out = tmp_path / "corpus.yaml"
    result = init("--labels", labels, "--audio", clips, "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == [f"id column: file (24 of 24 values match audio files in {clips})",
                         "split column: Split (Train 8, Val 8, Test 8)",
                         "group column: Actor (6 groups)"]
    assert "column row: not used (a different integer on every row: an index?)" in lines
    assert "task Emotion: classification, column Emotion (4 classes)" in lines
    assert "task Valence_mean: regression, column Valence (mean)" in lines
    assert ("task intensity: regression, column intensity; it holds 2 distinct integers: make it kind: "
            "classification if they are categories") in lines
    assert "task yes: classification, column yes (2 classes)" in lines
    assert "column notes: not used (24 distinct values, neither numbers nor few classes)" in lines
    assert lines[-2] == f"wrote {out}"
    assert lines[-1] == f"it reads as a corpus of 24 clips and 4 tasks; next: avb corpus check --spec {out}"

    text = out.read_text()
    assert "audio: data/clips\n" in text and "labels: data/meta.csv\n" in text   # relative to the yaml's folder
    desc = read_description(out)
    assert desc.audio_dir == tmp_path / "data" / "clips" and desc.label_files == [labels]
    assert (desc.id_column, desc.split_column, desc.group_column, desc.path_column) == ("file", "Split", "Actor", None)
    assert {name: (t.kind, t.columns) for name, t in desc.tasks.items()} == {
        "Emotion": ("classification", ("Emotion",)), "Valence_mean": ("regression", ("Valence (mean)",)),
        "intensity": ("regression", ("intensity",)), "yes": ("classification", ("yes",))}

    corpus = read_described_corpus(out, check_audio=True)
    order = np.argsort([r[1] for r in rows])
    assert corpus.ids == [rows[k][1] for k in order]
    assert corpus.tasks["Emotion"].classes == ("angry", "calm", "happy", "sad")
    expected_emotion = [("angry", "calm", "happy", "sad").index(rows[k][4]) for k in order]
    np.testing.assert_array_equal(corpus.labels["Emotion"][:, 0], expected_emotion)
    np.testing.assert_allclose(corpus.labels["Valence_mean"][:, 0], [float(rows[k][5]) for k in order])
    assert corpus.tasks["yes"].classes == ("maybe", "no")
    assert [corpus.audio_path(c).suffix for c in corpus.ids[:2]] == [".flac", ".wav"]
    assert len(set(corpus.groups)) == 6

    check = CliRunner().invoke(main, ["corpus", "check", "--spec", str(out)])
    assert check.exit_code == 0, check.output
    assert "sample rates: 16000 Hz x12, 48000 Hz x12" in check.output


def test_init_never_overwrites_without_force(tmp_path):
    labels, clips, _ = make_data(tmp_path, n=12)
    out = tmp_path / "corpus.yaml"
    out.write_text("mine\n")
    result = init("--labels", labels, "--audio", clips, "--out", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"Error: {out}: already exists (use --force to overwrite it)\n"
    assert out.read_text() == "mine\n"
    assert init("--labels", labels, "--audio", clips, "--out", out, "--force").exit_code == 0
    assert read_described_corpus(out).ids[0] == "03-01-00"


def test_paths_are_relative_to_the_yaml_folder_anywhere(tmp_path):
    labels, clips, _ = make_data(tmp_path, n=12)
    out = tmp_path / "conf" / "ravdess.yaml"
    out.parent.mkdir()
    assert init("--labels", labels, "--audio", clips, "--out", out).exit_code == 0
    assert "audio: ../data/clips\n" in out.read_text() and "name: conf\n" in out.read_text()
    assert len(read_described_corpus(out)) == 12
    missing = init("--labels", labels, "--audio", clips, "--out", tmp_path / "nowhere" / "c.yaml")
    assert missing.exit_code == 1 and missing.stderr == f"Error: {tmp_path / 'nowhere'}: no such folder\n"


def test_no_id_column_matching_the_audio_files(tmp_path):
    labels, clips, rows = make_data(tmp_path, n=6)
    write_csv(labels, HEADER, [[r[0], "x" + r[1], *r[2:]] for r in rows])
    with pytest.raises(DescriptionError) as err:
        draft_description(labels, clips, tmp_path / "corpus.yaml")
    assert str(err.value) == (f"{labels}: no column holds unique values that match the audio file names in "
                              f"{clips} (e.g. '03-01-00'); the id column must hold each clip's file name without "
                              f"its extension")
    result = init("--labels", labels, "--audio", clips, "--out", tmp_path / "corpus.yaml")
    assert result.exit_code == 1 and "no column holds unique values that match" in result.stderr
    assert not (tmp_path / "corpus.yaml").exists()


def test_a_path_column_no_split_and_a_speaker_group(tmp_path):
    audio = tmp_path / "wavs"
    (audio / "spk1").mkdir(parents=True)
    rows = []
    for i in range(8):
        rel = f"spk1/utt{i}.wav" if i < 4 else f"utt{i}.wav"
        write_wav(audio / rel, np.zeros(800 + i), 16000)
        rows.append([f"k{i}", rel, f"S{i // 4}", ["pos", "neg"][i % 2], f"{i * 0.5 - 1:.2f}"])
    labels = write_csv(tmp_path / "labels.csv", ["clip_id", "wav", "speaker_id", "polarity", "score"], rows)
    draft = draft_description(labels, audio, tmp_path / "corpus.yaml")
    assert draft.decisions[:4] == [f"path column: wav (8 of 8 values are audio files in {audio})",
                                   "id column: clip_id",
                                   "split column: none (every row is Train; folds are made at stage 2)",
                                   "group column: speaker_id (2 groups)"]
    (tmp_path / "corpus.yaml").write_text(draft.text)
    corpus = read_described_corpus(tmp_path / "corpus.yaml", check_audio=True)
    assert list(corpus.splits) == ["Train"] * 8 and corpus.groups == ["S0"] * 4 + ["S1"] * 4
    assert corpus.audio_path("k1") == audio / "spk1" / "utt1.wav"
    np.testing.assert_allclose(corpus.labels["score"][:, 0], [i * 0.5 - 1 for i in range(8)])
    np.testing.assert_array_equal(corpus.labels["polarity"][:, 0], [1, 0] * 4)   # classes: neg, pos


def test_a_csv_without_label_columns(tmp_path):
    audio = tmp_path / "a"
    audio.mkdir()
    rows = []
    for i in range(4):
        write_wav(audio / f"c{i}.wav", np.zeros(100), 16000)
        rows.append([f"c{i}", f"free text {i}"])
    labels = write_csv(tmp_path / "l.csv", ["id", "text"], rows)
    with pytest.raises(DescriptionError, match=r"l\.csv: no column looks like a label"):
        draft_description(labels, audio, tmp_path / "corpus.yaml")
