"""Prediction files, written and read in one place: A-VB's official submission format and any corpus's.

A-VB: one file per task, `A-VB-<High|Two|Culture|Type>_<team>_<n>.csv`: `File_ID` with square brackets, then
the task's columns in the official order (TYPE: `Voc_Type` holding the class name), one row per clip, sorted by
File_ID; runs also write TYPE's class probabilities (`type_probs.csv`, File_ID then one column per class).
Any other corpus: `<task>.csv` with the corpus's id column and the task's columns (the class name for a
classification task), and `<task>_probs.csv` (`p_<class>` columns) for each classification task. Ensembles
average the probabilities.

Ids are kept without brackets inside the project ("00001"); brackets are added and removed only here.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cache.command_kit.atomic import write_text_atomic
from cache.command_kit.errors import AvbError, where
from heads.metrics import class_indices
from heads.tasks import Task, TaskSet

PROBS_FILE = "type_probs.csv"    # A-VB's TYPE probabilities


class SubmissionError(AvbError):
    """A prediction or submission file that cannot be read or written; one line naming the file and row."""


def bracket_id(clip_id: str) -> str:
    return f"[{clip_id}]"


def strip_brackets(file_id: str, where: str = "") -> str:
    """'[00001]' -> '00001'. Unbracketed ids are accepted as they are."""
    text = file_id.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    if not text:
        raise SubmissionError(f"{where}empty File_ID")
    return text


def row_where(path: str | os.PathLike, row: int, raw_id: str | None) -> str:
    """`P, row n (File_ID [x])` (cache.format.where), or `P, row n` when the row has no usable File_ID cell."""
    try:
        return where(path, row, strip_brackets(raw_id or ""))
    except SubmissionError:
        return f"{path}, row {row}"


def submission_name(task: Task, team: str, number: int) -> str:
    """A-VB's official file name of one task's submission."""
    return f"A-VB-{task.file_stem}_{team}_{number}.csv"


def value_file_name(tasks: TaskSet, task: Task, team: str = "avb", number: int = 1) -> str:
    """The file holding one task's predictions: the official name for A-VB, `<task>.csv` otherwise."""
    return submission_name(task, team, number) if tasks.is_avb else f"{task.name}.csv"


def probs_file_name(tasks: TaskSet, task: Task) -> str:
    """The file holding a classification task's class probabilities."""
    return PROBS_FILE if tasks.is_avb else f"{task.name}_probs.csv"


def _id_cell(tasks: TaskSet, clip_id: str) -> str:
    return bracket_id(clip_id) if tasks.is_avb else clip_id


def _probs_header(tasks: TaskSet, task: Task) -> tuple[str, ...]:
    return (tasks.id_column,) + (task.classes if tasks.is_avb else tuple(f"p_{c}" for c in task.classes))


def number_text(value: float) -> str:
    """A value as every CSV the tool writes holds it: up to 9 significant digits, never NaN or inf."""
    if not math.isfinite(value):
        raise SubmissionError(f"refusing to write a non-finite prediction ({value})")
    return f"{value:.9g}"


def submission_text(tasks: TaskSet, task: Task, ids: Sequence[str], values: np.ndarray) -> str:
    """The CSV text of one task's predictions, rows sorted by id."""
    values = np.asarray(values)
    if len(ids) != len(values):
        raise SubmissionError(f"{task.title}: {len(ids)} ids but {len(values)} prediction rows")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((tasks.id_column,) + task.columns)
    if task.is_classification:
        classes = class_indices(values)
        for i in order:
            writer.writerow((_id_cell(tasks, ids[i]), task.classes[int(classes[i])]))
    else:
        if values.ndim != 2 or values.shape[1] != len(task.columns):
            raise SubmissionError(f"{task.title}: expected {len(task.columns)} columns, got shape {values.shape}")
        for i in order:
            writer.writerow([_id_cell(tasks, ids[i])] + [number_text(float(v)) for v in values[i]])
    return out.getvalue()


def write_submission(tasks: TaskSet, task: Task, path: str | os.PathLike, ids: Sequence[str],
                     values: np.ndarray) -> None:
    write_text_atomic(path, submission_text(tasks, task, ids, values))


def write_class_probs(tasks: TaskSet, task: Task, path: str | os.PathLike, ids: Sequence[str],
                      probs: np.ndarray) -> None:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(task.classes)):
        raise SubmissionError(f"{task.name} probabilities must have shape ({len(ids)}, {len(task.classes)}), "
                              f"got {probs.shape}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_probs_header(tasks, task))
    for i in sorted(range(len(ids)), key=lambda i: ids[i]):
        writer.writerow([_id_cell(tasks, ids[i])] + [number_text(v) for v in probs[i]])
    write_text_atomic(path, out.getvalue())


def write_predictions(folder: str | os.PathLike, tasks: TaskSet, ids: Sequence[str],
                      preds: Mapping[str, np.ndarray], *, team: str = "avb", number: int = 1,
                      probs_folder: str | os.PathLike | None = None) -> list[Path]:
    """Every task's value file in `preds` and each classification task's probabilities (in `probs_folder`,
    default `folder`); the paths written."""
    paths = []
    for task in tasks:
        if task.name not in preds:
            continue
        path = Path(folder) / value_file_name(tasks, task, team, number)
        write_submission(tasks, task, path, ids, preds[task.name])
        paths.append(path)
        if task.is_classification:
            path = Path(probs_folder or folder) / probs_file_name(tasks, task)
            write_class_probs(tasks, task, path, ids, preds[task.name])
            paths.append(path)
    return paths


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except FileNotFoundError:
        raise SubmissionError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise SubmissionError(f"{path}: not a UTF-8 text file") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if row]  # csv handles CRLF
    if not rows:
        raise SubmissionError(f"{path}: empty file")
    return [h.strip() for h in rows[0]], rows[1:]


def detect_task(header: Sequence[str], path: Path, tasks: TaskSet) -> Task:
    """The task whose value columns are exactly `header` (after the id column)."""
    if not header or header[0] != tasks.id_column:
        raise SubmissionError(f"{path}: first column must be {tasks.id_column!r}, found "
                              f"{header[0] if header else 'nothing'!r}")
    for task in tasks:
        if tuple(header[1:]) == task.columns:
            return task
    raise SubmissionError(
        f"{path}: columns {', '.join(header[1:5])}{'...' if len(header) > 5 else ''} match no {tasks.title} task "
        + ("(expected the official columns in the official order)" if tasks.is_avb
           else "(expected a task's columns in the described order)")
    )


def _parse_ids(rows: list[list[str]], path: Path) -> list[str]:
    ids, seen = [], set()
    for n, row in enumerate(rows, start=2):
        if not row or not row[0].strip():
            raise SubmissionError(f"{path}, row {n}: empty id")
        clip = strip_brackets(row[0], where=f"{path}, row {n}: ")
        if clip in seen:
            raise SubmissionError(f"{path}, row {n}: duplicate File_ID {row[0]!r}")
        seen.add(clip)
        ids.append(clip)
    return ids


def read_submission(path: str | os.PathLike, tasks: TaskSet) -> tuple[Task, list[str], np.ndarray]:
    """Read one task's value file: (task, ids without brackets, values).

    Values are float [N, k] for regression tasks and class indices [N] for classification. Errors name the
    file, the row (1-based, header = row 1) and the column.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    task = detect_task(header, path, tasks)
    for n, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise SubmissionError(f"{row_where(path, n, row[0] if row else None)}: {len(row)} cells, "
                             f"expected {len(header)}")
    ids = _parse_ids(rows, path)
    if task.is_classification:
        values = np.empty(len(rows), dtype=np.int64)
        for n, (clip, row) in enumerate(zip(ids, rows), start=2):
            name = row[1].strip()
            if name not in task.classes:
                raise SubmissionError(f"{where(path, n, clip, f'column {task.columns[0]}')}: unknown class {name!r}")
            values[n - 2] = task.classes.index(name)
        return task, ids, values
    return task, ids, _parse_numbers(path, rows, ids, task.columns)


def _parse_numbers(path: Path, rows: list[list[str]], ids: list[str], columns: Sequence[str]) -> np.ndarray:
    """The cells after File_ID as floats [N, k]; a bad cell is named by its row, File_ID and column."""
    values = np.empty((len(rows), len(columns)), dtype=np.float64)
    for n, (clip, row) in enumerate(zip(ids, rows), start=2):
        if len(row) != len(columns) + 1:
            raise SubmissionError(f"{where(path, n, clip)}: {len(row)} cells, expected {len(columns) + 1}")
        for j, cell in enumerate(row[1:]):
            try:
                values[n - 2, j] = float(cell)
            except ValueError:
                raise SubmissionError(f"{where(path, n, clip, f'column {columns[j]}')}: not a number: {cell!r}") from None
            if not math.isfinite(values[n - 2, j]):
                raise SubmissionError(f"{where(path, n, clip, f'column {columns[j]}')}: not a finite number: {cell!r}")
    return values


def read_class_probs(path: str | os.PathLike, tasks: TaskSet, task: Task) -> tuple[list[str], np.ndarray]:
    """Read a classification task's probabilities file: (ids without brackets, probabilities [N, n_classes])."""
    path = Path(path)
    header, rows = _read_rows(path)
    expected = _probs_header(tasks, task)
    if tuple(header) != expected:
        raise SubmissionError(f"{path}: expected columns {','.join(expected)}")
    ids = _parse_ids(rows, path)
    return ids, _parse_numbers(path, rows, ids, expected[1:])


def read_predictions(folder: str | os.PathLike, tasks: TaskSet) -> dict[str, tuple[list[str], np.ndarray]]:
    """Task -> (ids, values) for every task with a file in `folder`: class probabilities for a classification
    task with a probabilities file (a one-hot matrix of the class file otherwise), regression values [N, k]."""
    folder = Path(folder)
    found: dict[str, tuple[list[str], np.ndarray]] = {}
    names = sorted(folder.glob("A-VB-*.csv")) if tasks.is_avb else [folder / f"{t.name}.csv" for t in tasks]
    for path in names:
        if not path.is_file():
            continue
        task, ids, values = read_submission(path, tasks)
        if task.name in found:
            raise SubmissionError(f"{path}: a second {task.title} file in {folder}")
        if task.is_classification:
            probs = folder / probs_file_name(tasks, task)
            if probs.is_file():
                ids, values = read_class_probs(probs, tasks, task)
            else:
                values = np.eye(len(task.classes))[values]
        found[task.name] = (ids, values)
    return found
