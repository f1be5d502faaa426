"""A corpus described by a corpus.yaml: reading it, one clear line for every bad description, `open_corpus`'s
choice of reader, audio in formats other than WAV, and `avb corpus check` on a described corpus."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_csv

from extract.app.cli import main
from extract.audio import (
    AudioError,
    audio_info,
    load_audio,
    wav_info,
    write_wav,
)
from extract.corpus import Corpus
from extract.description import (
    SPEC_FILE,
    DescriptionError,
    open_corpus,
    read_described_corpus,
    read_description,
)
from heads.tasks import AVB

HEADER = ["id", "split", "speaker", "emotion", "valence", "arousal", "notes"]
# Written in this (unsorted) order; row n of labels.csv is ROWS[n - 2].
ROWS = [
    ["c05", "train", "s1", "sad", "0.1", "-2.5", "x"],
    ["c01", "Train", "s2", "happy", "0.7", "3", "y"],
    ["c03", "TRAIN", "s1", "angry", "", "1e-3", "z"],     # empty valence: unknown, allowed
    ["c02", "val", "s2", "sad", "0.2", "0.5", ""],
    ["c04", "Test", "s3", "", "junk", "", ""],            # Test: junk regression cell -> NaN
    ["c06", "test", "s3", "happy", "0.4", "0.25", ""],    # Test labels parsed when present and valid
]
SPEC = """\
name: mini
audio: audio
labels: labels.csv
id: id
split: split
group: speaker
tasks:
  emotion: {kind: classification, columns: [emotion]}
  affect: {kind: regression, columns: [valence, arousal]}
"""


def write_clips(folder: Path, ids, seconds: float = 0.1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, clip in enumerate(ids):
        write_wav(folder / f"{clip}.wav", np.full(int(seconds * 16000 * (k + 1)), 0.01), 16000, "PCM_16")


def make(root: Path, spec: str = SPEC, rows=None, header=None, audio: bool = True) -> Path:
    rows = ROWS if rows is None else rows
    write_csv(root / "labels.csv", header or HEADER, rows)
    if audio:
        write_clips(root / "audio", [r[0] for r in rows])
    (root / SPEC_FILE).write_text(spec)
    return root / SPEC_FILE


def error(spec: Path, **kwargs) -> str:
    with pytest.raises(DescriptionError) as err:
        read_described_corpus(spec, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- reading

def test_described_corpus_reads_ids_splits_groups_labels_and_audio(tmp_path):
    corpus = read_described_corpus(make(tmp_path))
    assert isinstance(corpus, Corpus)
    assert corpus.root == tmp_path and corpus.spec_path == tmp_path / SPEC_FILE
    assert corpus.ids == ["c01", "c02", "c03", "c04", "c05", "c06"]
    assert list(corpus.splits) == ["Train", "Val", "Train", "Test", "Train", "Test"]
    assert corpus.groups == ["s2", "s2", "s1", "s3", "s1", "s3"]
    assert corpus.countries == [""] * 6
    assert corpus.label_files == [tmp_path / "labels.csv"]
    assert corpus.name == "mini" and corpus.tasks.name == "mini" and not corpus.tasks.is_avb
    assert corpus.tasks.names == ("emotion", "affect")
    emotion, affect = corpus.tasks["emotion"], corpus.tasks["affect"]
    assert emotion.classes == ("angry", "happy", "sad")      # sorted distinct Train values
    assert affect.columns == ("valence", "arousal") and affect.kind == "regression"
    nan = np.nan
    np.testing.assert_array_equal(corpus.labels["emotion"], np.array([[1], [2], [0], [nan], [2], [1]], np.float32))
    np.testing.assert_array_equal(corpus.labels["affect"], np.array(
        [[0.7, 3], [0.2, 0.5], [nan, 1e-3], [nan, nan], [0.1, -2.5], [0.4, 0.25]], np.float32))
    assert corpus.labels["emotion"].dtype == np.float32 and corpus.labels["affect"].shape == (6, 2)
    assert corpus.audio_paths == {c: tmp_path / "audio" / f"{c}.wav" for c in corpus.ids}
    assert corpus.audio_path("c03") == tmp_path / "audio" / "c03.wav"
    np.testing.assert_array_equal(corpus.indices("Train"), [0, 2, 4])


def test_listed_classes_keep_their_order_and_name_defaults_to_the_folder(tmp_path):
    spec = SPEC.replace("name: mini\n", "").replace("columns: [emotion]}", "columns: [emotion], "
                                                     "classes: [sad, happy, angry, calm]}")
    corpus = read_described_corpus(make(tmp_path / "ravdess", spec))
    assert corpus.tasks["emotion"].classes == ("sad", "happy", "angry", "calm")
    np.testing.assert_array_equal(corpus.labels["emotion"][:, 0], [1, 0, 2, np.nan, 0, 1])
    assert corpus.name == "ravdess"
    assert read_description(tmp_path / "ravdess").name == "ravdess"  # a folder means its corpus.yaml


def test_no_split_column_makes_every_row_train_and_a_column_may_serve_two_tasks(tmp_path):
    spec = """\
audio: audio
labels: labels.csv
id: id
tasks:
  v: {kind: regression, columns: valence, range: [0, 1]}
  both: {kind: regression, columns: [valence, arousal], range: [0, 1]}
"""
    rows = [r[:3] + ["x", "0.5", "0.25", ""] for r in ROWS]
    corpus = read_described_corpus(make(tmp_path, spec, rows=rows))
    assert list(corpus.splits) == ["Train"] * 6 and corpus.groups == []
    np.testing.assert_array_equal(corpus.labels["v"], np.full((6, 1), 0.5, np.float32))
    np.testing.assert_array_equal(corpus.labels["both"], np.tile(np.float32([0.5, 0.25]), (6, 1)))


def test_path_column_and_label_files_joined_on_the_id(tmp_path):
    (tmp_path / "audio" / "a1").mkdir(parents=True)
    write_wav(tmp_path / "audio" / "a1" / "one.wav", np.zeros(160), 16000)
    write_wav(tmp_path / "audio" / "two.wav", np.zeros(160), 16000)
    write_csv(tmp_path / "meta.csv", ["key", "file", "split"],
              [["k2", "two.wav", "Val"], ["k1", "a1/one.wav", "Train"]])
    write_csv(tmp_path / "y.csv", ["mood", "key"], [["up", "k1"], ["down", "k2"]])
    spec = tmp_path / "described.yaml"
    spec.write_text("audio: audio\npath: file\nlabels: [meta.csv, y.csv]\nid: key\nsplit: split\n"
                    "tasks:\n  mood: {kind: classification, columns: [mood], classes: [down, up]}\n")
    corpus = read_described_corpus(spec, check_audio=True)
    assert corpus.ids == ["k1", "k2"]
    assert corpus.audio_paths == {"k1": tmp_path / "audio" / "a1" / "one.wav", "k2": tmp_path / "audio" / "two.wav"}
    np.testing.assert_array_equal(corpus.labels["mood"][:, 0], [1, 0])
    assert corpus.label_files == [tmp_path / "meta.csv", tmp_path / "y.csv"]
    # ids of the two files disagree: the id and the file are named
    write_csv(tmp_path / "y.csv", ["mood", "key"], [["up", "k1"], ["down", "k3"]])
    message = error(spec)
    assert message.startswith(f"{tmp_path / 'y.csv'}: id 'k2' is in {tmp_path / 'meta.csv'} but not in this file")


def test_audio_is_found_by_stem_in_any_format_and_non_audio_files_are_ignored(tmp_path):
    import soundfile

    spec = make(tmp_path, audio=False)
    write_clips(tmp_path / "audio", ["c01", "c02", "c03", "c04"])
    soundfile.write(tmp_path / "audio" / "c05.flac", np.zeros(800), 16000, subtype="PCM_16")
    soundfile.write(tmp_path / "audio" / "c06.ogg", np.zeros(800), 16000)
    (tmp_path / "audio" / "c01.txt").write_text("a transcript")      # not audio: no clash with c01.wav
    (tmp_path / "audio" / ".c02.wav").write_bytes(b"")                # hidden: ignored
    corpus = read_described_corpus(spec)
    assert corpus.audio_path("c05").name == "c05.flac" and corpus.audio_path("c06").name == "c06.ogg"
    assert corpus.audio_path("c01").name == "c01.wav"


# ---------------------------------------------------------------------------------------------- open_corpus

def write_avb(root: Path) -> None:
    """The smallest A-VB layout: the four task files with two clips."""
    for task in AVB:
        rows = []
        for clip, split in (("[00001]", "Train"), ("[00002]", "Val")):
            cells = [task.classes[0]] if task.is_classification else ["0.5"] * len(task.columns)
            rows.append([clip, split, *cells])
        write_csv(root / "labels" / task.info_csv, ["File_ID", "Split", *task.columns], rows)


def test_open_corpus_picks_the_spec_the_folder_yaml_or_the_avb_layout(tmp_path):
    write_avb(tmp_path / "avb")
    avb = open_corpus(tmp_path / "avb")
    assert avb.tasks is AVB and avb.spec_path is None and avb.ids == ["00001", "00002"]
    assert avb.audio_path("00001") == tmp_path / "avb" / "audio" / "wav" / "00001.wav"

    spec = make(tmp_path / "mine")
    assert open_corpus(tmp_path / "mine").spec_path == spec            # the folder's corpus.yaml wins
    assert open_corpus(spec).spec_path == spec                         # a yaml given as the root
    moved = tmp_path / "elsewhere.yaml"
    moved.write_text(SPEC.replace("audio: audio", "audio: mine/audio").replace("labels.csv", "mine/labels.csv"))
    assert open_corpus(None, moved).ids == open_corpus(spec).ids      # --spec
    assert open_corpus(tmp_path / "avb", moved).spec_path == moved     # spec beats root
    # an A-VB folder that also has a corpus.yaml is read through the yaml
    (tmp_path / "avb" / SPEC_FILE).write_text(SPEC)
    with pytest.raises(DescriptionError, match="labels.csv: no such file"):
        open_corpus(tmp_path / "avb")


# ---------------------------------------------------------------------------------------------- bad descriptions

@pytest.mark.parametrize(("change", "expected"), [
    (("tasks:", "colour: red\ntasks:"), "{spec}: unknown key 'colour' (expected some of name, audio, path"),
    (("columns: [emotion]}", "columns: [emotion], weight: 2}"),
     "{spec}, key tasks.emotion: unknown key 'weight' (expected kind, columns, classes, range)"),
    (("audio: audio\n", ""), "{spec}: required key 'audio' is missing"),
    (("labels: labels.csv\n", ""), "{spec}: required key 'labels' is missing"),
    (("id: id\n", ""), "{spec}: required key 'id' is missing"),
    ((SPEC[SPEC.index("tasks:"):], ""), "{spec}: required key 'tasks' is missing"),
    (("kind: regression", "kind: ordinal"),
     "{spec}, key tasks.affect.kind: unknown kind 'ordinal' (expected classification or regression)"),
    (("{kind: regression, columns: [valence, arousal]}", "{kind: regression}"),
     "{spec}, key tasks.affect: required key 'columns' is missing"),
    (("columns: [emotion]}", "columns: [emotion, valence]}"),
     "{spec}, key tasks.emotion.columns: a classification task reads exactly one column, got 2"),
    (("columns: [emotion]}", "columns: [emotion], classes: [sad]}"),
     "{spec}, key tasks.emotion.classes: a classification task needs at least two distinct classes, got ['sad']"),
    (("affect:", "2nd affect:"), "{spec}, key tasks: task name '2nd affect' must start with a letter"),
    (("group: speaker", "group: valence"), "{spec}, key group: column 'valence' is also a label column of task"),
    (("split: split", "split: emotion"), "{spec}, key split: column 'emotion' is also a label column of task"),
    (("id: id", "id: arousal"), "{spec}, key id: column 'arousal' is also a label column of task 'affect'"),
    (("id: id", "id: yes"), "{spec}, key id: True is read by YAML as a boolean; put it in quotes"),
    (("name: mini", "name: [a, b]"), "{spec}, key name: expected a non-empty string, got a list"),
])
def test_bad_descriptions_name_the_file_and_key(tmp_path, change, expected):
    spec = make(tmp_path, SPEC.replace(*change), audio=False)
    assert SPEC.replace(*change) != SPEC
    assert error(spec).startswith(expected.format(spec=spec))


def test_a_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path):
    spec = make(tmp_path, "- audio\n- labels\n", audio=False)
    assert error(spec) == (f"{spec}: not a corpus description (expected a mapping with the keys audio, labels, id, "
                           f"tasks; got a list)")
    spec.write_text("")
    assert error(spec).endswith("got an empty file)")
    spec.write_text("audio: audio\nlabels: [a.csv\nid: id\n")
    message = error(spec)
    assert message.startswith(f"{spec}, line ") and "malformed YAML" in message
    spec.write_text("audio: audio\n  tasks: x\n bad: [\n")
    assert "malformed YAML" in error(spec)
    assert error(tmp_path / "nothing.yaml") == f"{tmp_path / 'nothing.yaml'}: no such file"


def test_a_column_missing_from_the_csv(tmp_path):
    spec = make(tmp_path, SPEC.replace("columns: [valence, arousal]", "columns: [valence, dominance]"), audio=False)
    assert error(spec) == (f"{tmp_path / 'labels.csv'}: column 'dominance' (key tasks.affect.columns in {spec}) "
                           f"is missing")
    spec.write_text(SPEC.replace("id: id", "id: clip"))
    assert error(spec) == f"{tmp_path / 'labels.csv'}: column 'clip' (key id in {spec}) is missing"
    spec.write_text(SPEC.replace("labels: labels.csv", "labels: [labels.csv, more.csv]"))
    assert error(spec) == f"{tmp_path / 'more.csv'}: no such file (named by key labels in {spec})"


def test_duplicate_and_empty_ids(tmp_path):
    rows = [*ROWS, ["c03", "train", "s1", "sad", "0.1", "0.1", ""]]
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == f"{tmp_path / 'labels.csv'}, row 8, column id: duplicate id 'c03' (first at row 4)"
    rows = [*ROWS[:2], ["", "train", "s1", "sad", "0.1", "0.1", ""]]
    make(tmp_path, rows=rows, audio=False)
    assert error(spec) == f"{tmp_path / 'labels.csv'}, row 4, column id: empty id"


def test_missing_and_ambiguous_audio_files(tmp_path):
    spec = make(tmp_path)
    (tmp_path / "audio" / "c04.wav").unlink()
    (tmp_path / "audio" / "c06.wav").unlink()
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 6 (id 'c04'): no audio file named c04.<ext> in "
                           f"{tmp_path / 'audio'} (2 of 6 ids have none)")
    write_clips(tmp_path / "audio", ["c04", "c06"])
    write_wav(tmp_path / "audio" / "c06.flac", np.zeros(10), 16000)  # the content does not matter here
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 7 (id 'c06'): two audio files for this id in "
                           f"{tmp_path / 'audio'}: c06.flac, c06.wav (keep one, or name each clip's file in a "
                           f"`path` column)")
    spec.write_text(SPEC.replace("audio: audio", "audio: sounds"))
    assert error(spec) == f"{spec}, key audio: the audio folder {tmp_path / 'sounds'} does not exist"


def test_ids_and_paths_that_reach_outside_the_audio_folder(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[1][0] = "../c01"
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 3, column id: id '../c01' cannot name a file in the "
                           f"audio folder {tmp_path / 'audio'} (contains '/')")
    rows[1][0] = ".."
    make(tmp_path, rows=rows, audio=False)
    assert "id '..' cannot name a file in the audio folder" in error(spec)

    # a symlink in the audio folder that resolves outside it
    outside = tmp_path / "outside"
    write_clips(outside, ["c01"])
    make(tmp_path)
    (tmp_path / "audio" / "c01.wav").unlink()
    os.symlink(outside / "c01.wav", tmp_path / "audio" / "c01.wav")
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 3 (id 'c01'): {tmp_path / 'audio' / 'c01.wav'} is a "
                           f"link that reaches outside the audio folder {tmp_path / 'audio'}")

    # a path column: '..', absolute, and a symlinked folder leading out
    header = [*HEADER, "file"]
    (tmp_path / "audio" / "sub").symlink_to(outside, target_is_directory=True)
    spec_text = SPEC.replace("id: id", "id: id\npath: file")
    for cell, why in (("../outside/c01.wav", "reaches outside the audio folder"),
                      (str(outside / "c01.wav"), "must be relative to the audio folder"),
                      ("sub/c01.wav", "reaches outside the audio folder")):
        rows = [[*r, f"{r[0]}.wav"] for r in ROWS]
        rows[0][-1] = cell
        make(tmp_path, spec_text, rows=rows, header=header)
        assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 2 (id 'c05'), column file: path {cell!r} {why} "
                               f"{tmp_path / 'audio'}")
    rows[0][-1] = "nowhere.wav"
    make(tmp_path, spec_text, rows=rows, header=header)
    read_described_corpus(spec)  # paths are not stat'ed without check_audio
    assert error(spec, check_audio=True) == (
        f"{tmp_path / 'labels.csv'}, row 2 (id 'c05'), column file: no such audio file "
        f"{tmp_path / 'audio' / 'nowhere.wav'} (1 of 6 audio files missing)")


def test_a_val_or_test_class_absent_from_train(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[3][3] = "calm"   # c02, Val
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 5 (id 'c02'), column emotion: class 'calm' of a Val "
                           f"clip is not one of the Train classes of task 'emotion' (angry, happy, sad)")
    rows[3][3], rows[5][3] = "sad", "calm"   # c06, Test
    make(tmp_path, rows=rows, audio=False)
    assert "row 7 (id 'c06'), column emotion: class 'calm' of a Test clip" in error(spec)
    make(tmp_path, SPEC.replace("columns: [emotion]}", "columns: [emotion], classes: [sad, happy]}"), audio=False)
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 4 (id 'c03'), column emotion: class 'angry' of a Train "
                           f"clip is not one of the listed classes of task 'emotion' (sad, happy)")


def test_a_classification_task_with_one_class(tmp_path):
    rows = [[*r[:3], "sad" if r[1].lower() == "train" else "", *r[4:]] for r in ROWS]
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == (f"{spec}, key tasks.emotion: column 'emotion' has only one class ('sad') in its Train "
                           f"rows; a classification task needs at least two")


def test_a_regression_column_without_train_values(tmp_path):
    rows = [[*r[:4], "" if r[1].lower() == "train" else r[4], *r[5:]] for r in ROWS]
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == f"{spec}, key tasks.affect: column 'valence' has no value in any Train row"


@pytest.mark.parametrize(("cell", "what"), [("high", "not a number: 'high'"), ("nan", "not a finite number: 'nan'"),
                                            ("-inf", "not a finite number: '-inf'"), ("0,5", "not a number: '0,5'")])
def test_a_bad_regression_cell(tmp_path, cell, what):
    rows = [list(r) for r in ROWS]
    rows[3][5] = cell    # c02, Val, arousal
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == f"{tmp_path / 'labels.csv'}, row 5 (id 'c02'), column arousal: {what}"


def test_an_unknown_split(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[2][1] = "validation"
    spec = make(tmp_path, rows=rows, audio=False)
    assert error(spec) == (f"{tmp_path / 'labels.csv'}, row 4 (id 'c03'), column split: unknown split 'validation' "
                           f"(expected Train, Val or Test, any case)")


# ---------------------------------------------------------------------------------------------- audio formats

def sine(rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else wave


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (48000, 1), (44100, 2)])
def test_flac_decodes_exactly_as_the_same_samples_in_a_wav(tmp_path, rate, channels):
    import soundfile

    wave = sine(rate, channels=channels)
    write_wav(tmp_path / "a.wav", wave, rate, "PCM_16")
    ints = soundfile.read(tmp_path / "a.wav", dtype="int16")[0]
    soundfile.write(tmp_path / "a.flac", ints, rate, subtype="PCM_16")   # lossless: the same int16 samples
    from_wav, from_flac = load_audio(tmp_path / "a.wav"), load_audio(tmp_path / "a.flac")
    assert from_flac.dtype == np.float32 and from_flac.ndim == 1
    assert len(from_flac) == len(from_wav) == round(len(wave) * 16000 / rate)
    np.testing.assert_allclose(from_flac, from_wav, atol=1e-6)
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), from_wav)   # .wav goes through load_audio
    assert audio_info(tmp_path / "a.flac") == wav_info(tmp_path / "a.wav")
    assert audio_info(tmp_path / "a.flac").n_channels == channels


def test_ogg_and_upper_case_extensions(tmp_path):
    import soundfile

    soundfile.write(tmp_path / "a.ogg", sine(48000), 48000)
    out = load_audio(tmp_path / "a.ogg")
    assert out.dtype == np.float32 and abs(len(out) - 8000) <= 1
    np.testing.assert_allclose(out, load_wav_of(tmp_path, sine(48000), 48000), atol=0.05)  # lossy, but close
    write_wav(tmp_path / "B.WAV", sine(16000), 16000)
    assert audio_info(tmp_path / "B.WAV") == wav_info(tmp_path / "B.WAV")


def load_wav_of(folder: Path, wave: np.ndarray, rate: int) -> np.ndarray:
    write_wav(folder / "ref.wav", wave, rate, "FLOAT")
    return load_audio(folder / "ref.wav")


def test_audio_errors_for_other_formats_are_one_line(tmp_path):
    import soundfile

    def fails(path, func=load_audio, **kwargs):
        with pytest.raises(AudioError) as err:
            func(path, **kwargs)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert fails(tmp_path / "none.flac") == f"{tmp_path / 'none.flac'}: no such file"
    assert fails(tmp_path / "none.flac", audio_info) == f"{tmp_path / 'none.flac'}: no such file"
    (tmp_path / "empty.flac").write_bytes(b"")
    assert fails(tmp_path / "empty.flac") == f"{tmp_path / 'empty.flac'}: empty file (0 bytes)"
    (tmp_path / "text.flac").write_text("this is not audio at all, just some text " * 4)
    assert fails(tmp_path / "text.flac").startswith(f"{tmp_path / 'text.flac'}: not a readable audio file (")
    assert fails(tmp_path / "text.flac", audio_info).startswith(f"{tmp_path / 'text.flac'}: not a readable audio")
    (tmp_path / "dir.flac").mkdir()
    assert fails(tmp_path / "dir.flac") == f"{tmp_path / 'dir.flac'}: not a regular file"
    soundfile.write(tmp_path / "long.flac", np.zeros(16000 * 3), 16000, subtype="PCM_16")
    assert fails(tmp_path / "long.flac", max_seconds=2) == (
        f"{tmp_path / 'long.flac'}: clip is 3.00 s long, more than the 2 s maximum")
    soundfile.write(tmp_path / "zero.aiff", np.zeros(0), 16000, subtype="PCM_16")  # a header, no samples
    assert fails(tmp_path / "zero.aiff") == f"{tmp_path / 'zero.aiff'}: no audio samples (0 frames)"
    assert audio_info(tmp_path / "zero.aiff").n_frames == 0
    soundfile.write(tmp_path / "nan.caf", np.array([0.0, np.nan, 0.0]), 16000, subtype="FLOAT")
    assert fails(tmp_path / "nan.caf") == f"{tmp_path / 'nan.caf'}: non-finite sample (NaN or inf) at frame 1"


# ---------------------------------------------------------------------------------------------- avb corpus check

def run(*args):
    return CliRunner().invoke(main, ["corpus", "check", *map(str, args)])


def test_check_summarises_a_described_corpus(tmp_path):
    make(tmp_path)
    result = run(tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"corpus mini ({tmp_path / SPEC_FILE})"
    assert "clips: 6 (Train 3, Val 1, Test 2)" in lines
    assert "groups: 3" in lines
    assert "task emotion: classification, column emotion, 3 classes: angry, happy, sad" in lines
    assert "  Train: angry 1, happy 1, sad 1" in lines
    assert "  Val: angry 0, happy 0, sad 1" in lines
    assert "  Test: angry 0, happy 1, sad 0, unknown 1" in lines
    assert "task affect: regression, columns valence, arousal" in lines
    assert "  valence: Train 2 in [0.1, 0.7], mean 0.4; Val 1 in [0.2, 0.2], mean 0.2; Test 1 in [0.4, 0.4], " \
           "mean 0.4" in lines
    assert "durations: min 0.10 s, mean 0.35 s, max 0.60 s" in lines
    assert "missing audio files: 0" in lines and "unreadable audio files: 0" in lines

    summary = json.loads(run("--spec", tmp_path / SPEC_FILE, "--json").stdout)
    assert summary["splits"] == {"Train": 3, "Val": 1, "Test": 2} and summary["n_groups"] == 3
    emotion, affect = summary["tasks"]
    assert emotion["class_counts"]["Train"] == {"angry": 1, "happy": 1, "sad": 1, "unknown": 0}
    assert affect["values"]["arousal"]["Train"] == pytest.approx(
        {"n": 3, "min": -2.5, "mean": (3 - 2.5 + 1e-3) / 3, "max": 3.0})
    assert summary["audio"]["sample_rates"] == {"16000": 6}


def test_check_lists_unreadable_audio_of_a_described_corpus(tmp_path):
    make(tmp_path)
    (tmp_path / "audio" / "c02.wav").unlink()
    (tmp_path / "audio" / "c02.flac").write_text("not audio")
    result = run("--spec", tmp_path / SPEC_FILE)
    assert result.exit_code == 1
    assert "unreadable audio files: 1" in result.stdout
    assert f"  {tmp_path / 'audio' / 'c02.flac'}: not a readable audio file (" in result.stdout
    assert result.stderr.strip() == (f"Error: 0 missing and 1 unreadable audio files "
                                     f"(first: {tmp_path / 'audio' / 'c02.flac'})")


def test_check_reports_a_bad_description_in_one_line(tmp_path):
    spec = make(tmp_path, SPEC.replace("kind: regression", "kind: ordinal"))
    result = run(tmp_path)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"Error: {spec}, key tasks.affect.kind: unknown kind 'ordinal' (expected "
                             f"classification or regression)\n")
    assert run("--no-audio").exit_code == 2   # neither --corpus nor --spec
    assert run(tmp_path, "--spec", spec).exit_code == 2


def test_a_regression_range_is_given_or_the_train_minimum_and_maximum(tmp_path):
    # Train rows: valence 0.1, 0.7, (unknown); arousal -2.5, 3, 1e-3 -> one range over both columns
    corpus = read_described_corpus(make(tmp_path / "a", audio=True))
    assert (corpus.tasks["affect"].low, corpus.tasks["affect"].high) == (-2.5, 3.0)
    given = SPEC.replace("columns: [valence, arousal]}", "columns: [valence, arousal], range: [-5, 5]}")
    corpus = read_described_corpus(make(tmp_path / "b", spec=given))
    assert (corpus.tasks["affect"].low, corpus.tasks["affect"].high) == (-5.0, 5.0)
    assert corpus.tasks.to_json()["tasks"][1]["range"] == [-5.0, 5.0]


@pytest.mark.parametrize("bounds", ["[5, 5]", "[1]", "[a, 2]", "[.inf, 2]"])
def test_a_bad_regression_range(tmp_path, bounds):
    spec = make(tmp_path, spec=SPEC.replace("columns: [valence, arousal]}",
                                            f"columns: [valence, arousal], range: {bounds}}}"), audio=False)
    assert error(spec).startswith(f"{spec}, key tasks.affect.range: expected [low, high], two finite numbers")


def test_constant_train_labels_without_a_range_are_refused(tmp_path):
    rows = [[*r[:4], "0.5", "0.5", *r[6:]] for r in ROWS]
    spec = make(tmp_path, rows=rows)
    assert error(spec) == (f"{spec}, key tasks.affect: every Train label is 0.5; a regression task needs varying "
                           "values (or give range: [low, high])")
