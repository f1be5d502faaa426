"""The official submission format: exact headers, bracketed sorted ids, and clear read errors."""
import re

import numpy as np
import pytest

from heads.submission import (
    PROBS_FILE,
    SubmissionError,
    read_class_probs,
    read_submission,
    submission_name,
    write_class_probs,
    write_predictions,
)
from heads.tasks import AVB


def test_write_then_read_round_trip_with_official_names_headers_and_order(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["00003", "00001", "00002"]
    preds = {"type": rng.random((3, 8)), "two": rng.random((3, 2)), "high": rng.random((3, 10)),
             "culture": rng.random((3, 40))}
    paths = write_predictions(tmp_path, AVB, ids, preds, team="team", number=2)
    assert PROBS_FILE in [p.name for p in paths]  # TYPE's probabilities come with the submission files
    assert sorted(p.name for p in paths if p.name != PROBS_FILE) == sorted(
        ["A-VB-Type_team_2.csv", "A-VB-Two_team_2.csv", "A-VB-High_team_2.csv", "A-VB-Culture_team_2.csv"])
    lines = (tmp_path / "A-VB-Two_team_2.csv").read_bytes().split(b"\n")
    assert lines[0] == b"File_ID,Valence,Arousal"
    assert [line.split(b",")[0] for line in lines[1:4]] == [b"[00001]", b"[00002]", b"[00003]"]
    assert (tmp_path / "A-VB-Culture_team_2.csv").read_text().startswith(
        "File_ID,China_Awe,China_Excitement,")
    assert (tmp_path / "A-VB-Type_team_2.csv").read_text().splitlines()[0] == "File_ID,Voc_Type"
    for name in ("two", "high", "culture"):
        task, got_ids, values = read_submission(tmp_path / submission_name(AVB[name], "team", 2), AVB)
        assert task.name == name and got_ids == ["00001", "00002", "00003"]
        np.testing.assert_allclose(values, preds[name][[1, 2, 0]], rtol=1e-8)
    task, got_ids, classes = read_submission(tmp_path / "A-VB-Type_team_2.csv", AVB)
    np.testing.assert_array_equal(classes, preds["type"][[1, 2, 0]].argmax(1))


def test_type_probs_round_trip(tmp_path):
    probs = np.random.default_rng(1).dirichlet(np.ones(8), size=4)
    write_class_probs(AVB, AVB["type"], tmp_path / "p.csv", ["b", "a", "d", "c"], probs)
    ids, got = read_class_probs(tmp_path / "p.csv", AVB, AVB["type"])
    assert ids == ["a", "b", "c", "d"]
    np.testing.assert_allclose(got, probs[[1, 0, 3, 2]], rtol=1e-8)


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "two.csv"
    path.write_bytes(b"\xef\xbb\xbfFile_ID,Valence,Arousal\r\n[00001],0.5,0.25\r\n")
    task, ids, values = read_submission(path, AVB)
    assert task.name == "two" and ids == ["00001"] and values.tolist() == [[0.5, 0.25]]


@pytest.mark.parametrize("text, message", [
    ("File_ID,Arousal,Valence\n[1],0.1,0.2\n", "match no A-VB task"),
    ("Id,Valence,Arousal\n[1],0.1,0.2\n", "first column must be 'File_ID'"),
    ("File_ID,Valence,Arousal\n[1],0.1,abc\n", "row 2 (File_ID [1]), column Arousal: not a number: 'abc'"),
    ("File_ID,Valence,Arousal\n[1],0.1,nan\n", "row 2 (File_ID [1]), column Arousal: not a finite number"),
    ("File_ID,Valence,Arousal\n[1],0.1,0.2\n[1],0.3,0.2\n", "row 3: duplicate File_ID '[1]'"),
    ("File_ID,Valence,Arousal\n[1],0.1\n", "row 2 (File_ID [1]): 2 cells, expected 3"),
    ("File_ID,Valence,Arousal\n,0.1\n", "row 2: 2 cells, expected 3"),
    ("File_ID,Voc_Type\n[1],Sigh\n", "row 2 (File_ID [1]), column Voc_Type: unknown class 'Sigh'"),
    ("", "empty file"),
])
def test_read_errors_name_file_row_and_column(tmp_path, text, message):
    path = tmp_path / "pred.csv"
    path.write_text(text)
    with pytest.raises(SubmissionError, match=re.escape(message)) as err:
        read_submission(path, AVB)
    assert str(path) in str(err.value)


def test_type_probability_errors_name_row_file_id_and_column(tmp_path):
    path = tmp_path / PROBS_FILE
    header = "File_ID," + ",".join(AVB["type"].classes)
    path.write_text(f"{header}\n[7]" + ",0.125" * 7 + ",x\n")
    with pytest.raises(SubmissionError) as err:
        read_class_probs(path, AVB, AVB["type"])
    assert str(err.value) == f"{path}, row 2 (File_ID [7]), column Other: not a number: 'x'"
    path.write_text(f"{header}\n[7]" + ",0.125" * 7 + "\n")
    with pytest.raises(SubmissionError) as err:
        read_class_probs(path, AVB, AVB["type"])
    assert str(err.value) == f"{path}, row 2 (File_ID [7]): 8 cells, expected 9"


def test_non_finite_predictions_are_refused(tmp_path):
    with pytest.raises(SubmissionError, match="non-finite"):
        write_predictions(tmp_path, AVB, ["1"], {"two": np.array([[np.nan, 0.1]])}, team="t", number=1)
    assert not list(tmp_path.iterdir())  # nothing half-written
