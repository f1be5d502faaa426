"""The corpus reader and `avb corpus check`: both official layouts, and one clear line for every broken input."""
import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from extract.app.cli import main
from extract.audio import write_wav
from extract.corpus import CorpusError, read_corpus
from heads.tasks import AVB, COUNTRIES, EMOTIONS, TYPE_CLASSES

SPLIT_ORDER = ["Train", "Val", "Test", "Train", "Val", "Test", "Train", "Val", "Test"]
TYPES = ["Laugh", "Gasp", None, "Laugh", "Pant", None, "Cry", "Other", None]
DURATIONS = [0.25, 0.5, 0.75, 0.3, 0.4, 0.6, 0.35, 0.45, 0.55]
# written in this (unsorted) order, so row n of a file is WRITE_ORDER[n - 2]
WRITE_ORDER = [4, 0, 8, 2, 6, 1, 7, 3, 5]


def make_rows(seed: int = 0) -> list[dict[str, str]]:
    """Nine clips, three per split, with every label column; Test rows have empty labels and country."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in WRITE_ORDER:
        split = SPLIT_ORDER[i]
        row = {"File_ID": f"[{i + 1:05d}]", "Split": split, "Country": ""}
        for task in AVB:
            for col in task.columns:
                row[col] = ""
        if split != "Test":
            row["Country"] = COUNTRIES[i % 4]
            row["Voc_Type"] = TYPES[i]
            for task in ("two", "high", "culture"):
                for col in AVB[task].columns:
                    row[col] = f"{rng.random():.4f}"
            row["Awe"] = "1"  # exact endpoints are valid
            row["Fear"] = "0.0"
        rows.append(row)
    return rows


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]], *, bom=False, crlf=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(col, "") for col in header])


def write_task_file(root: Path, task: str, rows, **kwargs) -> Path:
    path = root / "labels" / AVB[task].info_csv
    write_csv(path, ["File_ID", "Split", *AVB[task].columns], rows, **kwargs)
    return path


def write_data_info(root: Path, rows, **kwargs) -> Path:
    header = ["File_ID", "Split", "Country", *EMOTIONS, "Valence", "Arousal", *AVB["culture"].columns]
    path = root / "labels" / "data_info.csv"
    write_csv(path, header, rows, **kwargs)
    return path


def write_audio(root: Path) -> None:
    for i, seconds in enumerate(DURATIONS):
        write_wav(root / "audio" / "wav" / f"{i + 1:05d}.wav", np.zeros(int(seconds * 16000)), 16000, "PCM_16")


def make_corpus(root: Path, layout: str = "tasks", audio: bool = True, rows=None) -> list[dict[str, str]]:
    rows = make_rows() if rows is None else rows
    if layout in ("tasks", "both"):
        for task in AVB.names:
            write_task_file(root, task, rows)
    if layout in ("data_info", "both"):
        write_data_info(root, rows)
        write_task_file(root, "type", rows)
    if audio:
        write_audio(root)
    return rows


def expected_labels(rows) -> dict[str, np.ndarray]:
    by_id = {r["File_ID"].strip("[]"): r for r in rows}
    out = {}
    for name, task in zip(AVB.names, AVB):
        array = np.full((len(rows), task.label_dim), np.nan, dtype=np.float32)
        for k, clip in enumerate(sorted(by_id)):
            row = by_id[clip]
            if row["Split"] == "Test":
                continue
            if task.is_classification:
                array[k, 0] = TYPE_CLASSES.index(row["Voc_Type"])
            else:
                array[k] = [float(row[c]) for c in task.columns]
        out[name] = array
    return out


def error(root: Path, **kwargs) -> str:
    with pytest.raises(CorpusError) as err:
        read_corpus(root, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def error_in_cell(root: Path, row: int, column: str, value: str) -> str:
    """The corpus error after `make_rows()[row][column] = value` (labels only)."""
    rows = make_rows()
    rows[row][column] = value
    make_corpus(root, audio=False, rows=rows)
    return error(root)


# ---------------------------------------------------------------------------------------------- reading

def test_task_file_layout_reads_sorted_ids_splits_and_labels(tmp_path):
    rows = make_corpus(tmp_path)
    corpus = read_corpus(tmp_path, check_audio=True)
    assert corpus.ids == [f"{i:05d}" for i in range(1, 10)]
    assert list(corpus.splits) == SPLIT_ORDER
    assert len(corpus) == 9
    np.testing.assert_array_equal(corpus.indices("Train"), [0, 3, 6])
    np.testing.assert_array_equal(corpus.indices("Test"), [2, 5, 8])
    assert corpus.audio_path("00003") == tmp_path / "audio" / "wav" / "00003.wav"
    expected = expected_labels(rows)
    for name, task in zip(AVB.names, AVB):
        assert corpus.labels[name].dtype == np.float32
        assert corpus.labels[name].shape == (9, task.label_dim)
        np.testing.assert_array_equal(corpus.labels[name], expected[name])
    np.testing.assert_array_equal(corpus.labels["type"][:, 0], [1, 0, np.nan, 1, 6, np.nan, 2, 7, np.nan])
    assert np.isnan(corpus.labels["culture"][corpus.indices("Test")]).all()
    assert corpus.countries == [""] * 9  # the task files carry no Country
    with pytest.raises(CorpusError, match="unknown split 'train'"):
        corpus.indices("train")


def test_data_info_layout_gives_the_same_labels_and_countries(tmp_path):
    rows = make_corpus(tmp_path / "a", layout="tasks", audio=False)
    make_corpus(tmp_path / "b", layout="data_info", audio=False, rows=rows)
    a, b = read_corpus(tmp_path / "a"), read_corpus(tmp_path / "b")
    assert a.ids == b.ids
    for name in AVB.names:
        np.testing.assert_array_equal(a.labels[name], b.labels[name])
    assert b.countries == ["China", "United States", "", "Venezuela", "China", "", "South Africa",
                           "Venezuela", ""]
    assert [p.name for p in b.label_files] == ["type_info.csv", "data_info.csv"]


def test_task_files_win_over_data_info_which_still_supplies_country(tmp_path):
    rows = make_corpus(tmp_path, layout="tasks", audio=False)
    zeroed = copy.deepcopy(rows)
    for row in zeroed:
        if row["Split"] != "Test":
            row.update({c: "0" for c in ("Valence", "Arousal", *EMOTIONS, *AVB["culture"].columns)})
    write_data_info(tmp_path, zeroed)
    corpus = read_corpus(tmp_path)
    np.testing.assert_array_equal(corpus.labels["high"], expected_labels(rows)["high"])
    assert corpus.countries[0] == "China"


def test_columns_by_name_in_any_order_with_extras_bom_and_crlf(tmp_path):
    rows = make_corpus(tmp_path, audio=False)
    reference = read_corpus(tmp_path)
    header = ["Arousal", "Comment", "Split", "Valence", "File_ID"]
    for row in rows:
        row["Comment"] = "x, y"
    write_csv(tmp_path / "labels" / "two_info.csv", header, rows, bom=True, crlf=True)
    corpus = read_corpus(tmp_path)
    np.testing.assert_array_equal(corpus.labels["two"], reference.labels["two"])


def test_test_rows_with_labels_are_ignored(tmp_path):
    rows = make_rows()
    for row in rows:
        if row["Split"] == "Test":
            row["Valence"], row["Arousal"], row["Voc_Type"] = "7", "oops", "Sigh"
    make_corpus(tmp_path, audio=False, rows=rows)
    corpus = read_corpus(tmp_path)
    assert np.isnan(corpus.labels["two"][corpus.indices("Test")]).all()
    assert np.isnan(corpus.labels["type"][corpus.indices("Test")]).all()


# ---------------------------------------------------------------------------------------------- errors

def test_no_label_files(tmp_path):
    (tmp_path / "labels").mkdir()
    assert error(tmp_path) == (
        f"{tmp_path / 'labels'}: no label files found (expected high_info.csv, two_info.csv, culture_info.csv "
        "and type_info.csv, or data_info.csv and type_info.csv)")


def test_a_missing_task_file_is_named(tmp_path):
    make_corpus(tmp_path, audio=False)
    (tmp_path / "labels" / "two_info.csv").unlink()
    assert error(tmp_path) == (
        f"{tmp_path / 'labels' / 'two_info.csv'}: no such file (and no data_info.csv to read A-VB-TWO from)")
    make_corpus(tmp_path, layout="data_info", audio=False)
    (tmp_path / "labels" / "type_info.csv").unlink()
    assert error(tmp_path) == (f"{tmp_path / 'labels' / 'type_info.csv'}: no such file "
                               "(A-VB-TYPE labels live only there; data_info.csv has no Voc_Type)")


def test_required_column_missing(tmp_path):
    rows = make_corpus(tmp_path, audio=False)
    path = tmp_path / "labels" / "two_info.csv"
    write_csv(path, ["File_ID", "Split", "Valence"], rows)
    assert error(tmp_path) == f"{path}: required column 'Arousal' is missing"
    write_csv(path, ["File_ID", "Valence", "Arousal"], rows)
    assert error(tmp_path) == f"{path}: required column 'Split' is missing"


def test_id_in_one_file_but_not_another(tmp_path):
    rows = make_corpus(tmp_path, audio=False)
    type_path = tmp_path / "labels" / "type_info.csv"
    high_path = tmp_path / "labels" / "high_info.csv"
    write_task_file(tmp_path, "high", [r for r in rows if r["File_ID"] != "[00003]"])
    assert error(tmp_path) == f"{high_path}: File_ID [00003] is in {type_path} but not in this file (1 such ids)"
    extra = dict(rows[0], File_ID="[00042]")
    write_task_file(tmp_path, "high", rows + [extra])
    assert error(tmp_path) == f"{high_path}: File_ID [00042] is not in {type_path} (1 such ids)"


def test_duplicate_id(tmp_path):
    rows = make_corpus(tmp_path, audio=False)
    path = write_task_file(tmp_path, "culture", rows + [rows[1]])
    assert error(tmp_path) == f"{path}, row 11: duplicate File_ID '[00001]' (first at row 3)"


def test_unknown_split(tmp_path):
    message = error_in_cell(tmp_path, 2, "Split", "Validation")
    assert message == (f"{tmp_path / 'labels' / 'type_info.csv'}, row 4 (File_ID {make_rows()[2]['File_ID']}), "
                       "column Split: unknown split "
                       "'Validation' (expected Train, Val or Test)")


def test_inconsistent_split_across_files(tmp_path):
    rows = make_corpus(tmp_path, audio=False)
    changed = copy.deepcopy(rows)
    changed[1]["Split"] = "Val"  # [00001] is Train elsewhere
    path = write_task_file(tmp_path, "two", changed)
    assert error(tmp_path) == (f"{path}, row 3: File_ID [00001] has Split 'Val' but "
                               f"{tmp_path / 'labels' / 'type_info.csv'} says 'Train'")


@pytest.mark.parametrize("bad_id, reason", [
    ("[../evil]", "contains '/'"), ("[a\\b]", "contains '\\\\'"), ("[..x]", "contains '..'"),
])
def test_ids_that_would_escape_audio_wav(tmp_path, bad_id, reason):
    message = error_in_cell(tmp_path, 0, "File_ID", bad_id)
    assert message == (f"{tmp_path / 'labels' / 'type_info.csv'}, row 2: File_ID {bad_id!r} cannot "
                       f"name a file under audio/wav ({reason})")


def test_empty_id(tmp_path):
    message = error_in_cell(tmp_path, 3, "File_ID", "[]")
    assert message == f"{tmp_path / 'labels' / 'type_info.csv'}, row 5: empty File_ID"


@pytest.mark.parametrize("value, problem", [
    ("", "empty label for a Train clip"),
    ("nan", "not a finite number: 'nan'"),
    ("abc", "not a number: 'abc'"),
    ("1.5", "value 1.5 is outside [0, 1]"),
    ("-0.01", "value -0.01 is outside [0, 1]"),
])
def test_bad_regression_labels_in_train(tmp_path, value, problem):
    message = error_in_cell(tmp_path, 1, "Sadness", value)  # [00001], Train, row 3
    assert message == (f"{tmp_path / 'labels' / 'high_info.csv'}, row 3 (File_ID [00001]), column Sadness: "
                       f"{problem}")


def test_bad_label_in_val_is_caught_too(tmp_path):
    message = error_in_cell(tmp_path, 0, "United States_Surprise", "2")  # [00005], Val
    assert message == (f"{tmp_path / 'labels' / 'culture_info.csv'}, row 2 (File_ID [00005]), column "
                       "United States_Surprise: value 2 is outside [0, 1]")


def test_unknown_voc_type(tmp_path):
    message = error_in_cell(tmp_path, 0, "Voc_Type", "Sigh")
    assert message == (f"{tmp_path / 'labels' / 'type_info.csv'}, row 2 (File_ID [00005]), column Voc_Type: "
                       "unknown vocal type 'Sigh' (expected one of Gasp, Laugh, Cry, Scream, Grunt, Groan, "
                       "Pant, Other)")


def test_ragged_row(tmp_path):
    make_corpus(tmp_path, audio=False)
    path = tmp_path / "labels" / "type_info.csv"
    path.write_text(path.read_text() + "\n,,\n[00010],Train\n")  # blank lines are skipped but still counted
    assert error(tmp_path) == f"{path}, row 13 (File_ID [00010]): 2 cells, expected 3"
    path.write_text(path.read_text().replace("[00010],Train\n", ",Train,Laugh,x\n"))   # no File_ID to name
    assert error(tmp_path) == f"{path}, row 13: 4 cells, expected 3"


def test_check_audio_names_a_missing_wav(tmp_path):
    make_corpus(tmp_path)
    (tmp_path / "audio" / "wav" / "00004.wav").unlink()
    (tmp_path / "audio" / "wav" / "00007.wav").unlink()
    read_corpus(tmp_path)  # labels alone are fine
    assert error(tmp_path, check_audio=True) == (
        f"{tmp_path / 'audio' / 'wav' / '00004.wav'}: no such audio file (2 of 9 wav files missing)")


# ---------------------------------------------------------------------------------------------- CLI

def run(*args):
    return CliRunner().invoke(main, ["corpus", "check", *map(str, args)])


def test_cli_summary_text(tmp_path):
    make_corpus(tmp_path, layout="data_info")
    result = run(tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "clips: 9 (Train 3, Val 3, Test 3)" in lines
    assert "Train types: Gasp 0, Laugh 2, Cry 1, Scream 0, Grunt 0, Groan 0, Pant 0, Other 0" in lines
    assert ("countries: China 2, United States 1, South Africa 1, Venezuela 2, unknown 3") in lines
    assert "durations: min 0.25 s, mean 0.46 s, max 0.75 s" in lines  # mean of DURATIONS = 0.4611
    assert "sample rates: 16000 Hz x9" in lines
    assert "channels: 1 x9" in lines
    assert "missing wav files: 0" in lines and "unreadable wav files: 0" in lines


def test_cli_json(tmp_path):
    make_corpus(tmp_path)
    result = run(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_clips"] == 9
    assert summary["splits"] == {"Train": 3, "Val": 3, "Test": 3}
    assert summary["train_type_counts"]["Laugh"] == 2 and sum(summary["train_type_counts"].values()) == 3
    assert summary["countries"]["unknown"] == 9
    audio = summary["audio"]
    assert audio["duration_s"]["min"] == pytest.approx(min(DURATIONS))
    assert audio["duration_s"]["mean"] == pytest.approx(np.mean(DURATIONS))
    assert audio["duration_s"]["max"] == pytest.approx(max(DURATIONS))
    assert audio["sample_rates"] == {"16000": 9} and audio["channels"] == {"1": 9}
    assert audio["missing"] == [] and audio["unreadable"] == []


def test_cli_no_audio_skips_the_wav_files(tmp_path):
    make_corpus(tmp_path, audio=False)
    result = run(tmp_path, "--no-audio")
    assert result.exit_code == 0, result.output
    assert "audio: not checked (--no-audio)" in result.output
    assert json.loads(run(tmp_path, "--no-audio", "--json").stdout)["audio"] == {"checked": False}


def test_cli_collects_every_missing_and_unreadable_file(tmp_path):
    make_corpus(tmp_path)
    wav_dir = tmp_path / "audio" / "wav"
    (wav_dir / "00002.wav").unlink()
    (wav_dir / "00006.wav").unlink()
    (wav_dir / "00003.wav").write_bytes(b"not a wav")
    write_wav(wav_dir / "00008.wav", np.zeros((800, 2)), 8000, "FLOAT")
    result = run(tmp_path)
    assert result.exit_code == 1
    assert f"  {wav_dir / '00002.wav'}" in result.stdout.splitlines()
    assert f"  {wav_dir / '00006.wav'}" in result.stdout.splitlines()
    assert f"  {wav_dir / '00003.wav'}: not a WAV file (starts with b'not ', expected b'RIFF'...b'WAVE')" \
        in result.stdout.splitlines()
    assert "sample rates: 8000 Hz x1, 16000 Hz x5" in result.stdout
    assert "channels: 1 x5, 2 x1" in result.stdout
    assert result.stderr.strip() == f"Error: 2 missing and 1 unreadable wav files (first: {wav_dir / '00002.wav'})"

    result = run(tmp_path, "--json")
    assert result.exit_code == 1
    audio = json.loads(result.stdout)["audio"]
    assert audio["n_missing"] == 2 and audio["n_unreadable"] == 1
    assert audio["unreadable"][0]["path"] == str(wav_dir / "00003.wav")
    assert result.stderr.startswith("Error: 2 missing and 1 unreadable")


def test_cli_invalid_corpus_is_one_error_line(tmp_path):
    rows = make_rows()
    rows[0]["Voc_Type"] = "Sigh"
    make_corpus(tmp_path, rows=rows)
    result = run(tmp_path)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (f"Error: {tmp_path / 'labels' / 'type_info.csv'}, row 2 (File_ID [00005]), column "
                             "Voc_Type: unknown vocal type 'Sigh' (expected one of Gasp, Laugh, Cry, Scream, Grunt, "
                             "Groan, Pant, Other)\n")
