"""The A-VB corpus reader: the official label CSVs and wav folder -> ids, splits and label arrays.

Two layouts exist in the wild (`avb-format.md`): the four task files `labels/{high,two,culture,type}_info.csv`
that the official baseline reads, and `labels/data_info.csv` (emotions, Valence/Arousal, culture columns and
`Country`, but no `Voc_Type`) + `labels/type_info.csv`. Per task the dedicated file wins; `data_info.csv`
fills in the tasks whose file is absent and supplies `Country` when present. Columns are found by name.

Everything a later stage would trip over -- an id in one file but not another, a split typo, a label outside
[0, 1], an id that would name a path outside `audio/wav` -- is rejected here with one line naming the file,
the row (header = row 1), the clip's File_ID and the value, so a day-long fine-tuning run never starts on a
broken corpus.
Test rows are unlabelled by definition, so whatever their label cells hold is ignored (NaN).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.command_kit.errors import AvbError, where
from heads.submission import SubmissionError, bracket_id, row_where, strip_brackets
from heads.tasks import AVB, SPLITS, Task, TaskSet

LABELS_DIR = "labels"
AUDIO_DIR = ("audio", "wav")
DATA_INFO = "data_info.csv"
_ID, _SPLIT, _COUNTRY = "File_ID", "Split", "Country"
_UNSAFE = ("/", "\\", "..", "\x00")


class CorpusError(AvbError):
    """A corpus that cannot be used; the message is one line naming the file, row and value."""


@dataclass
class Corpus:
    """Label-side view of a corpus, rows sorted by id. Audio is located by `audio_path`, never preloaded.

    The same shape for the A-VB layout (`read_corpus`) and for a corpus described by a `corpus.yaml`
    (`extract.description`): `tasks` says what the labels are, `audio_paths` (described corpora) maps each id
    to its file, `groups` holds each clip's speaker/group ("" for none)."""

    root: Path
    ids: list[str]                  # without brackets, sorted ascending
    splits: np.ndarray              # str: "Train" | "Val" | "Test", aligned with ids
    labels: dict[str, np.ndarray]   # task name -> float32 [N, label_dim]; NaN where unknown; class index for
                                    # a classification task
    countries: list[str]            # A-VB's Country; "" when unknown
    label_files: list[Path] = field(default_factory=list)  # the CSVs that were read, for reports
    tasks: TaskSet = AVB
    groups: list[str] = field(default_factory=list)        # aligned with ids; empty list: no group column
    audio_paths: dict[str, Path] | None = None            # id -> audio file (described corpora)
    spec_path: Path | None = None                          # the corpus.yaml read, None for the A-VB layout

    def audio_path(self, clip_id: str) -> Path:
        if self.audio_paths is not None:
            return self.audio_paths[clip_id]
        return self.root.joinpath(*AUDIO_DIR, f"{clip_id}.wav")

    @property
    def name(self) -> str:
        return self.tasks.name

    def indices(self, split: str) -> np.ndarray:
        """Row positions of one split, ascending."""
        if split not in SPLITS:
            raise CorpusError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == split)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Table:
    path: Path
    columns: dict[str, int]               # header name -> cell index
    rows: list[tuple[int, list[str]]]      # (1-based line number, stripped cells)
    ids: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    def require(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name not in self.columns:
                raise CorpusError(f"{self.path}: required column {name!r} is missing")


def _read_table(path: Path) -> _Table:
    """Read a CSV (UTF-8 with or without BOM, LF or CRLF), skipping blank lines."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header: list[str] | None = None
            rows: list[tuple[int, list[str]]] = []
            for cells in reader:
                if not "".join(cells).strip():
                    continue
                cells = [c.strip() for c in cells]
                if header is None:
                    header = cells
                    continue
                if len(cells) != len(header):
                    at = header.index(_ID) if _ID in header else len(cells)
                    raise CorpusError(f"{row_where(path, reader.line_num, cells[at] if at < len(cells) else None)}: "
                                      f"{len(cells)} cells, expected {len(header)}")
                rows.append((reader.line_num, cells))
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as err:
        raise CorpusError(f"{path}: malformed CSV ({err})") from None
    if header is None:
        raise CorpusError(f"{path}: empty file (no header row)")
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        if name in columns:
            raise CorpusError(f"{path}: column {name!r} appears twice in the header")
        columns[name] = index
    return _Table(path, columns, rows)


def _parse_ids(table: _Table) -> None:
    """Fill table.ids / table.splits, rejecting empty, unsafe and duplicate ids and unknown splits."""
    table.require((_ID, _SPLIT))
    id_col, split_col = table.columns[_ID], table.columns[_SPLIT]
    first_row: dict[str, int] = {}
    for line, cells in table.rows:
        raw = cells[id_col]
        try:
            clip = strip_brackets(raw)
        except SubmissionError:
            raise CorpusError(f"{table.path}, row {line}: empty File_ID") from None
        bad = next((s for s in _UNSAFE if s in clip), None)
        if bad is not None:
            raise CorpusError(f"{table.path}, row {line}: File_ID {raw!r} cannot name a file under audio/wav "
                              f"(contains {bad!r})")
        if clip in first_row:
            raise CorpusError(f"{table.path}, row {line}: duplicate File_ID {raw!r} (first at row {first_row[clip]})")
        first_row[clip] = line
        split = cells[split_col]
        if split not in SPLITS:
            raise CorpusError(f"{where(table.path, line, clip, 'column Split')}: unknown split {split!r} "
                              f"(expected Train, Val or Test)")
        table.ids.append(clip)
        table.splits.append(split)


def _check_same_ids(reference: _Table, other: _Table) -> None:
    """Every label file must describe the same clips with the same splits."""
    ref_split = dict(zip(reference.ids, reference.splits))
    other_ids = set(other.ids)
    missing = sorted(set(ref_split) - other_ids)
    if missing:
        raise CorpusError(f"{other.path}: File_ID {bracket_id(missing[0])} is in {reference.path} but not in this "
                          f"file ({len(missing)} such ids)")
    extra = sorted(other_ids - set(ref_split))
    if extra:
        raise CorpusError(f"{other.path}: File_ID {bracket_id(extra[0])} is not in {reference.path} "
                          f"({len(extra)} such ids)")
    for (line, _), clip, split in zip(other.rows, other.ids, other.splits):
        if ref_split[clip] != split:
            raise CorpusError(f"{other.path}, row {line}: File_ID {bracket_id(clip)} has Split {split!r} but "
                              f"{reference.path} says {ref_split[clip]!r}")


def _parse_labels(table: _Table, task: Task) -> dict[str, np.ndarray]:
    """clip id -> label row for every Train/Val row of `table` (Test rows are left unknown)."""
    table.require(task.columns)
    cols = [table.columns[c] for c in task.columns]
    labelled = [(line, cells, clip, split) for (line, cells), clip, split
                in zip(table.rows, table.ids, table.splits) if split != "Test"]
    if task.is_classification:
        out = {}
        for line, cells, clip, _ in labelled:
            name = cells[cols[0]]
            if name not in task.classes:
                raise CorpusError(f"{where(table.path, line, clip, f'column {task.columns[0]}')}: unknown vocal "
                                  f"type {name!r} (expected one of {', '.join(task.classes)})")
            out[clip] = np.array([task.classes.index(name)], dtype=np.float32)
        return out
    # Fast path: numpy parses the whole block at once (59k x 40 cells); the cell-by-cell loop only runs to
    # find and name the first bad cell.
    try:
        values = np.array([[cells[c] for c in cols] for _, cells, _, _ in labelled], dtype=np.float64)
        ok = np.isfinite(values).all() and values.min(initial=0.0) >= 0.0 and values.max(initial=0.0) <= 1.0
    except ValueError:
        values, ok = None, False
    if not ok:
        for line, cells, clip, split in labelled:
            for col, name in zip(cols, task.columns):
                _check_cell(cells[col], where(table.path, line, clip, f"column {name}"), split)
    if values is None:  # numpy refused a spelling Python's float() accepts: all cells are valid, parse them so
        values = np.array([[float(cells[c]) for c in cols] for _, cells, _, _ in labelled], dtype=np.float64)
    values = values.reshape(len(labelled), len(cols)).astype(np.float32)
    return {clip: values[i] for i, (_, _, clip, _) in enumerate(labelled)}


def _check_cell(text: str, where: str, split: str) -> None:
    """Raise the error that describes a bad regression label cell; silent for a good one."""
    if not text:
        raise CorpusError(f"{where}: empty label for a {split} clip")
    try:
        value = float(text)
    except ValueError:
        raise CorpusError(f"{where}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise CorpusError(f"{where}: not a finite number: {text!r}")
    if not 0.0 <= value <= 1.0:
        raise CorpusError(f"{where}: value {text} is outside [0, 1]")


def _label_sources(labels_dir: Path) -> tuple[dict[str, Path], Path | None]:
    """Which CSV each task is read from, and data_info.csv if present."""
    data_info = labels_dir / DATA_INFO
    has_data_info = data_info.is_file()
    task_files = {task.name: labels_dir / task.info_csv for task in AVB}
    if not has_data_info and not any(p.is_file() for p in task_files.values()):
        raise CorpusError(f"{labels_dir}: no label files found (expected high_info.csv, two_info.csv, "
                          f"culture_info.csv and type_info.csv, or data_info.csv and type_info.csv)")
    sources: dict[str, Path] = {}
    for task in AVB:
        name = task.name
        path = task_files[name]
        if path.is_file():
            sources[name] = path
        elif has_data_info and not task.is_classification:
            sources[name] = data_info
        elif task.is_classification:
            raise CorpusError(f"{path}: no such file (A-VB-TYPE labels live only there; "
                              f"{DATA_INFO} has no Voc_Type)")
        else:
            raise CorpusError(f"{path}: no such file (and no {DATA_INFO} to read {task.title} from)")
    return sources, data_info if has_data_info else None


def read_corpus(root: str | os.PathLike, *, check_audio: bool = False) -> Corpus:
    """Read and validate the labels of a corpus in the official layout.

    With `check_audio`, every clip's wav must exist (existence only; `avb corpus check` also decodes headers).
    """
    root = Path(root)
    if not root.is_dir():  # say so, rather than the misleading "no label files found" under a missing root
        raise CorpusError(f"{root}: {'not a directory' if root.exists() else 'no such corpus directory'}")
    labels_dir = root / LABELS_DIR
    sources, data_info = _label_sources(labels_dir)
    paths = list(dict.fromkeys(list(sources.values()) + ([data_info] if data_info else [])))
    tables = {path: _read_table(path) for path in paths}
    for table in tables.values():
        _parse_ids(table)
    reference = tables[paths[0]]
    for table in list(tables.values())[1:]:
        _check_same_ids(reference, table)

    ids = sorted(reference.ids)
    position = {clip: i for i, clip in enumerate(ids)}
    split_of = dict(zip(reference.ids, reference.splits))
    labels: dict[str, np.ndarray] = {}
    for task in AVB:
        name = task.name
        array = np.full((len(ids), task.label_dim), np.nan, dtype=np.float32)
        for clip, row in _parse_labels(tables[sources[name]], task).items():
            array[position[clip]] = row
        labels[name] = array

    countries = [""] * len(ids)
    country_table = tables[data_info] if data_info else next(
        (t for t in tables.values() if _COUNTRY in t.columns), None)
    if country_table is not None and _COUNTRY in country_table.columns:
        col = country_table.columns[_COUNTRY]
        for (_, cells), clip in zip(country_table.rows, country_table.ids):
            countries[position[clip]] = cells[col]

    corpus = Corpus(root, ids, np.array([split_of[c] for c in ids], dtype=str), labels, countries, paths)
    if check_audio:
        missing = missing_wavs(corpus)
        if missing:
            raise CorpusError(f"{missing[0]}: no such audio file ({len(missing)} of {len(corpus)} wav files missing)")
    return corpus


def missing_wavs(corpus: Corpus) -> list[Path]:
    """Paths of all clips whose wav file does not exist, in id order (one directory listing, not N stats)."""
    folder = corpus.root.joinpath(*AUDIO_DIR)
    try:
        present = {entry.name for entry in os.scandir(folder) if entry.is_file()}
    except FileNotFoundError:
        present = set()
    return [corpus.audio_path(clip) for clip in corpus.ids if f"{clip}.wav" not in present]
