"""Any corpus, described by a `corpus.yaml`: where its audio is, which CSV columns hold the ids, splits, groups
and labels, and what each task is.

    name: ravdess                  # optional (default: the yaml's folder name)
    audio: audio                   # folder of the clips, relative to the yaml's folder
    path: file                     # optional: a column holding each clip's path relative to `audio`
    labels: labels.csv             # one CSV, or a list of CSVs joined on the id column
    id: id                         # the id column
    split: split                   # optional: Train / Val / Test (any case); without it every row is Train
    group: speaker                 # optional: a speaker / group column
    tasks:                         # in the default chain order
      emotion:   {kind: classification, columns: [emotion]}
      intensity: {kind: classification, columns: [intensity], classes: [normal, strong]}
      affect:    {kind: regression, columns: [valence, arousal], range: [1, 9]}   # range: optional

`read_described_corpus` turns it into the same `Corpus` the A-VB reader returns, and `open_corpus` is the one
entry every command uses: an explicit description, else `<root>/corpus.yaml`, else the A-VB layout.
Without `path`, a clip is the one audio file in the audio folder whose name without its extension is the id
(one directory listing for the whole corpus).

Classification classes are the listed ones, or the sorted distinct values of the Train rows; a Val or Test
value must be one of them. Regression values are any finite real numbers; the heads predict inside the task's
range (`range`, else the Train labels' min and max). An empty label cell is unknown
(NaN), so partial labels are fine; a Test row's regression cell that does not parse is unknown too.
Every bad description is one line naming the file, the key or the row, column and id.
`draft_description` (`avb corpus init`) guesses a description from a CSV and an audio folder.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.audio import AUDIO_EXTENSIONS
from extract.corpus import Corpus, CorpusError, _read_table, _Table, read_corpus
from heads.tasks import KINDS, SPLITS, Task, TaskError, TaskSet

SPEC_FILE = "corpus.yaml"
KEYS = ("name", "audio", "path", "labels", "id", "split", "group", "tasks")
REQUIRED = ("audio", "labels", "id", "tasks")
TASK_KEYS = ("kind", "columns", "classes", "range")
_SPLIT_NAMES = {s.lower(): s for s in SPLITS}
_UNSAFE_ID = ("/", "\\", "\x00")


class DescriptionError(CorpusError):
    """A corpus.yaml, or the files it describes, that cannot be used; one line naming the file and key or row."""


@dataclass(frozen=True)
class TaskSpec:
    """One task as the yaml gives it; `classes` is None until the Train rows supply them."""

    name: str
    kind: str
    columns: tuple[str, ...]
    classes: tuple[str, ...] | None = None
    value_range: tuple[float, float] | None = None   # a regression task's `range: [low, high]`

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


@dataclass
class Description:
    """A parsed corpus.yaml. `audio_dir` and `label_files` are joined onto the yaml's folder (an absolute path in
    the yaml stays as it is); `tasks` keeps the yaml's order, the default chain order."""

    spec_path: Path
    name: str
    audio_dir: Path
    path_column: str | None
    label_files: list[Path]
    id_column: str
    split_column: str | None
    group_column: str | None
    tasks: dict[str, TaskSpec] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.spec_path.parent

    def columns(self) -> dict[str, str]:
        """Every column the description names -> the key that names it (for 'column missing' errors)."""
        named = {self.id_column: "id"}
        for key, column in (("split", self.split_column), ("group", self.group_column), ("path", self.path_column)):
            if column is not None:
                named.setdefault(column, key)
        for task in self.tasks.values():
            for column in task.columns:
                named.setdefault(column, f"tasks.{task.name}.columns")
        return named


# ---------------------------------------------------------------------------------------------- the yaml

def _spec_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / SPEC_FILE if path.is_dir() else path


def _scalar(value: Any, spec: Path, key: str) -> str:
    """A yaml value that must be one string (numbers are taken as their text); booleans and nulls are refused."""
    if isinstance(value, bool):
        raise DescriptionError(f"{spec}, key {key}: {value!r} is read by YAML as a boolean; put it in quotes")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        shown = "nothing" if value is None else f"a {type(value).__name__}"
        raise DescriptionError(f"{spec}, key {key}: expected a non-empty string, got {shown}")
    return value.strip()


def _strings(value: Any, spec: Path, key: str) -> list[str]:
    """A string or a non-empty list of strings."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise DescriptionError(f"{spec}, key {key}: expected a name or a non-empty list of names, got []")
    return [_scalar(item, spec, key) for item in items]


def _load_yaml(spec: Path) -> Any:
    # safe_load only: tests/test_bad_input.py rejects `import yaml` (it would allow yaml.load)
    from yaml import YAMLError, safe_load

    try:
        text = spec.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DescriptionError(f"{spec}: no such file") from None
    except IsADirectoryError:
        raise DescriptionError(f"{spec}: is a directory, not a corpus description") from None
    except UnicodeDecodeError:
        raise DescriptionError(f"{spec}: not a UTF-8 text file") from None
    try:
        return safe_load(text)
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DescriptionError(f"{spec}{at}: malformed YAML ({problem})") from None


def _read_task(name: Any, body: Any, spec: Path) -> TaskSpec:
    if not isinstance(name, str):
        raise DescriptionError(f"{spec}, key tasks: task name {name!r} must be a string")
    key = f"tasks.{name}"
    if not isinstance(body, dict):
        raise DescriptionError(f"{spec}, key {key}: expected a mapping with kind and columns, "
                               f"got {'nothing' if body is None else type(body).__name__}")
    for k in body:
        if k not in TASK_KEYS:
            raise DescriptionError(f"{spec}, key {key}: unknown key {k!r} (expected {', '.join(TASK_KEYS)})")
    for k in ("kind", "columns"):
        if k not in body:
            raise DescriptionError(f"{spec}, key {key}: required key {k!r} is missing")
    kind = body["kind"]
    if kind not in KINDS:
        raise DescriptionError(f"{spec}, key {key}.kind: unknown kind {kind!r} (expected {' or '.join(KINDS)})")
    columns = tuple(_strings(body["columns"], spec, f"{key}.columns"))
    if len(set(columns)) != len(columns):
        raise DescriptionError(f"{spec}, key {key}.columns: a column is named twice ({', '.join(columns)})")
    classes = None
    if kind == "classification":
        if len(columns) != 1:
            raise DescriptionError(f"{spec}, key {key}.columns: a classification task reads exactly one column, "
                                   f"got {len(columns)} ({', '.join(columns)})")
        if body.get("classes") is not None:
            if not isinstance(body["classes"], list):
                raise DescriptionError(f"{spec}, key {key}.classes: expected a list of class names")
            classes = tuple(_scalar(c, spec, f"{key}.classes") for c in body["classes"])
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise DescriptionError(f"{spec}, key {key}.classes: a classification task needs at least two "
                                       f"distinct classes, got {list(classes)}")
    elif body.get("classes") is not None:
        raise DescriptionError(f"{spec}, key {key}.classes: a regression task has no classes")
    value_range = None
    if body.get("range") is not None:
        bounds = body["range"]
        if kind != "regression":
            raise DescriptionError(f"{spec}, key {key}.range: only a regression task has a range")
        if (not isinstance(bounds, list) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                           for b in bounds) or not bounds[0] < bounds[1]):
            raise DescriptionError(f"{spec}, key {key}.range: expected [low, high], two finite numbers with "
                                   f"low < high, got {bounds!r}")
        value_range = (float(bounds[0]), float(bounds[1]))
    return TaskSpec(name, kind, columns, classes, value_range)


def read_description(path: str | os.PathLike) -> Description:
    """Parse and check a corpus.yaml (or the corpus.yaml of a folder); the CSVs are not read here."""
    spec = _spec_file(path)
    data = _load_yaml(spec)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise DescriptionError(f"{spec}: not a corpus description (expected a mapping with the keys "
                               f"{', '.join(REQUIRED)}; got {got})")
    for key in data:
        if key not in KEYS:
            raise DescriptionError(f"{spec}: unknown key {key!r} (expected some of {', '.join(KEYS)})")
    for key in REQUIRED:
        if data.get(key) is None:
            raise DescriptionError(f"{spec}: required key {key!r} is missing")
    root = spec.parent
    name = _scalar(data["name"], spec, "name") if data.get("name") is not None else (
        root.resolve().name or "corpus")
    audio_dir = root / _scalar(data["audio"], spec, "audio")
    label_files = [root / p for p in _strings(data["labels"], spec, "labels")]
    if len(set(label_files)) != len(label_files):
        raise DescriptionError(f"{spec}, key labels: a file is named twice")
    optional = {k: _scalar(data[k], spec, k) if data.get(k) is not None else None for k in ("path", "split", "group")}
    id_column = _scalar(data["id"], spec, "id")

    tasks_body = data["tasks"]
    if not isinstance(tasks_body, dict) or not tasks_body:
        raise DescriptionError(f"{spec}, key tasks: expected a mapping of task names to "
                               f"{{kind: ..., columns: [...]}}, with at least one task")
    tasks = {}
    for task_name, body in tasks_body.items():
        task = _read_task(task_name, body, spec)
        tasks[task.name] = task
    try:  # the task set's own checks (names, duplicates), with placeholder classes where none are listed yet
        TaskSet(tuple(Task(t.name, t.kind, t.columns, t.classes or (("?a", "?b") if t.is_classification else ()))
                      for t in tasks.values()))
    except TaskError as err:
        raise DescriptionError(f"{spec}, key tasks: {err}") from None

    task_columns = {column: t.name for t in tasks.values() for column in t.columns}
    special = {"id": id_column, **{k: v for k, v in optional.items() if v is not None}}
    for key, column in special.items():
        if column in task_columns:
            raise DescriptionError(f"{spec}, key {key}: column {column!r} is also a label column of task "
                                   f"{task_columns[column]!r}")
    for a, b in (("split", "id"), ("group", "id"), ("split", "group"), ("split", "path")):
        if a in special and b in special and special[a] == special[b]:
            raise DescriptionError(f"{spec}, key {a}: column {special[a]!r} is also the {b} column")
    return Description(spec, name, audio_dir, optional["path"], label_files, id_column, optional["split"],
                       optional["group"], tasks)


# ---------------------------------------------------------------------------------------------- the CSVs

def _at(path: Path, row: int, clip: str, column: str | None = None) -> str:
    """`P, row n (id 'x')[, column C]`: where a cell of a described corpus is."""
    return f"{path}, row {row} (id {clip!r})" + (f", column {column}" if column else "")


def _index_ids(table: _Table, desc: Description) -> dict[str, int]:
    """id -> row index in `table`, rejecting empty, unsafe and duplicate ids."""
    col = table.columns[desc.id_column]
    first: dict[str, tuple[int, int]] = {}
    for index, (line, cells) in enumerate(table.rows):
        clip = cells[col]
        if not clip:
            raise DescriptionError(f"{table.path}, row {line}, column {desc.id_column}: empty id")
        if clip in first:
            raise DescriptionError(f"{table.path}, row {line}, column {desc.id_column}: duplicate id {clip!r} "
                                   f"(first at row {first[clip][0]})")
        if desc.path_column is None:
            bad = next((s for s in _UNSAFE_ID if s in clip), None)
            if bad is not None or clip in (".", ".."):
                why = f"contains {bad!r}" if bad is not None else "is a folder name"
                raise DescriptionError(f"{table.path}, row {line}, column {desc.id_column}: id {clip!r} cannot "
                                       f"name a file in the audio folder {desc.audio_dir} ({why})")
        first[clip] = (line, index)
    return {clip: index for clip, (_, index) in first.items()}


def _join(tables: list[_Table], indexes: list[dict[str, int]]) -> None:
    """Every label file must list the same ids."""
    reference, ref_ids = tables[0], indexes[0]
    for table, ids in zip(tables[1:], indexes[1:]):
        missing = sorted(set(ref_ids) - set(ids))
        if missing:
            raise DescriptionError(f"{table.path}: id {missing[0]!r} is in {reference.path} but not in this file "
                                   f"({len(missing)} such ids)")
        extra = sorted(set(ids) - set(ref_ids))
        if extra:
            raise DescriptionError(f"{table.path}: id {extra[0]!r} is not in {reference.path} "
                                   f"({len(extra)} such ids)")


def _audio_listing(desc: Description) -> dict[str, list[str]]:
    """Stem -> names of the audio files in the audio folder (one listing; hidden files and non-audio skipped)."""
    folder = desc.audio_dir
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DescriptionError(f"{desc.spec_path}, key audio: the audio folder {folder} {what}")
    stems: dict[str, list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in AUDIO_EXTENSIONS:
                continue
            if entry.is_file():
                stems.setdefault(stem, []).append(name)
    return stems


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def _resolve_audio(desc: Description, ids: list[str], where_of: dict[str, tuple[Path, int]],
                   path_cells: dict[str, tuple[str, tuple[Path, int]]] | None,
                   check_audio: bool) -> dict[str, Path]:
    """id -> audio file: the `path` column (cell, (file, row) per id), or the one audio file whose stem is the
    id (`where_of` says where each id's row is)."""
    folder = desc.audio_dir
    real_folder = folder.resolve()
    out: dict[str, Path] = {}
    if path_cells is not None:
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise DescriptionError(f"{desc.spec_path}, key audio: the audio folder {folder} {what}")
        for clip in ids:
            text, cell_at = path_cells[clip]
            at = _at(*cell_at, clip, desc.path_column)
            if not text:
                raise DescriptionError(f"{at}: empty path")
            rel = Path(text)
            if rel.is_absolute() or text.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", text):
                raise DescriptionError(f"{at}: path {text!r} must be relative to the audio folder {folder}")
            if "\x00" in text or ".." in rel.parts or not _inside(folder / rel, real_folder):
                raise DescriptionError(f"{at}: path {text!r} reaches outside the audio folder {folder}")
            out[clip] = folder / rel
        if check_audio:
            missing = [clip for clip in ids if not out[clip].is_file()]
            if missing:
                clip = missing[0]
                raise DescriptionError(f"{_at(*path_cells[clip][1], clip, desc.path_column)}: no such audio file "
                                       f"{out[clip]} ({len(missing)} of {len(ids)} audio files missing)")
        return out

    stems = _audio_listing(desc)
    missing = [clip for clip in ids if clip not in stems]
    if missing:
        clip = missing[0]
        raise DescriptionError(f"{_at(*where_of[clip], clip)}: no audio file named {clip}.<ext> in {folder} "
                               f"({len(missing)} of {len(ids)} ids have none)")
    for clip in ids:
        names = stems[clip]
        if len(names) > 1:
            raise DescriptionError(f"{_at(*where_of[clip], clip)}: two audio files for this id in {folder}: "
                                   f"{', '.join(sorted(names)[:2])} (keep one, or name each clip's file in a "
                                   f"`path` column)")
        path = folder / names[0]
        if path.is_symlink() and not _inside(path, real_folder):
            raise DescriptionError(f"{_at(*where_of[clip], clip)}: {path} is a link that reaches outside the "
                                   f"audio folder {folder}")
        out[clip] = path
    return out


def _parse_split(text: str, at: str) -> str:
    split = _SPLIT_NAMES.get(text.strip().lower())
    if split is None:
        raise DescriptionError(f"{at}: unknown split {text!r} (expected Train, Val or Test, any case)")
    return split


def _classes(task: TaskSpec, desc: Description, cells: list[str], splits: list[str]) -> tuple[str, ...]:
    """The listed classes, or the sorted distinct values of the Train rows."""
    if task.classes is not None:
        return task.classes
    found = sorted({c for c, s in zip(cells, splits) if c and s == "Train"})
    if len(found) < 2:
        shown = f"only one class ({found[0]!r})" if found else "no class at all"
        raise DescriptionError(f"{desc.spec_path}, key tasks.{task.name}: column {task.columns[0]!r} has {shown} in "
                               f"its Train rows; a classification task needs at least two")
    return tuple(found)


def read_described_corpus(spec_path: str | os.PathLike, *, check_audio: bool = False) -> Corpus:
    """Read a corpus.yaml and the files it names into a `Corpus` (rows sorted by id).

    Every clip's audio file is located here (a missing one is an error); `check_audio` also checks that the
    files named by a `path` column exist."""
    desc = read_description(spec_path)
    tables = []
    for path in desc.label_files:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "no such file"
            raise DescriptionError(f"{path}: {what} (named by key labels in {desc.spec_path})")
        tables.append(_read_table(path))
    for table in tables:
        if desc.id_column not in table.columns:
            raise DescriptionError(f"{table.path}: column {desc.id_column!r} (key id in {desc.spec_path}) is "
                                   f"missing")
    # Each column is read from the first label file that has it.
    source: dict[str, _Table] = {}
    for column, key in desc.columns().items():
        table = next((t for t in tables if column in t.columns), None)
        if table is None:
            files = tables[0].path if len(tables) == 1 else "every label file (" + ", ".join(
                str(t.path) for t in tables) + ")"
            raise DescriptionError(f"{files}: column {column!r} (key {key} in {desc.spec_path}) is missing")
        source[column] = table
    indexes = [_index_ids(table, desc) for table in tables]
    _join(tables, indexes)
    ids = sorted(indexes[0])
    n = len(ids)
    if n == 0:
        raise DescriptionError(f"{tables[0].path}: no rows (the corpus has no clips)")
    index_of = {table.path: index for table, index in zip(tables, indexes)}

    def column_cells(column: str) -> tuple[_Table, list[str], list[int]]:
        """The column's cells in id order, with their table and row numbers."""
        table = source[column]
        col, rows, index = table.columns[column], table.rows, index_of[table.path]
        picked = [rows[index[clip]] for clip in ids]
        return table, [cells[col] for _, cells in picked], [line for line, _ in picked]

    id_table = tables[0]
    where_of = {clip: (id_table.path, id_table.rows[indexes[0][clip]][0]) for clip in ids}
    if desc.split_column is None:
        splits = ["Train"] * n
    else:
        table, cells, lines = column_cells(desc.split_column)
        splits = [_parse_split(text, _at(table.path, line, clip, desc.split_column))
                  for text, line, clip in zip(cells, lines, ids)]
    groups = column_cells(desc.group_column)[1] if desc.group_column is not None else []

    is_train = np.array(splits) == "Train"
    labels: dict[str, np.ndarray] = {}
    resolved: list[Task] = []
    for spec in desc.tasks.values():
        if spec.is_classification:
            column = spec.columns[0]
            table, cells, lines = column_cells(column)
            classes = _classes(spec, desc, cells, splits)
            position = {name: i for i, name in enumerate(classes)}
            array = np.full((n, 1), np.nan, dtype=np.float32)
            for k, (text, line, clip, split) in enumerate(zip(cells, lines, ids, splits)):
                if not text:
                    continue
                if text not in position:
                    origin = "listed" if spec.classes is not None else "Train"
                    raise DescriptionError(f"{_at(table.path, line, clip, column)}: class {text!r} of a {split} "
                                           f"clip is not one of the {origin} classes of task {spec.name!r} "
                                           f"({', '.join(classes)})")
                array[k, 0] = position[text]
            resolved.append(Task(spec.name, spec.kind, spec.columns, classes))
        else:
            array = np.full((n, len(spec.columns)), np.nan, dtype=np.float32)
            for j, column in enumerate(spec.columns):
                table, cells, lines = column_cells(column)
                for k, (text, line, clip, split) in enumerate(zip(cells, lines, ids, splits)):
                    if not text:
                        continue
                    value = _number(text)
                    if value is None or not math.isfinite(value):
                        if split == "Test":  # Test labels are optional: junk there is unknown
                            continue
                        what = "not a number" if value is None else "not a finite number"
                        raise DescriptionError(f"{_at(table.path, line, clip, column)}: {what}: {text!r}")
                    array[k, j] = value
                if not np.isfinite(array[is_train, j]).any():
                    raise DescriptionError(f"{desc.spec_path}, key tasks.{spec.name}: column {column!r} has no "
                                           f"value in any Train row")
            low, high = spec.value_range or _train_range(desc, spec, array[is_train])
            resolved.append(Task(spec.name, spec.kind, spec.columns, low=low, high=high))
        labels[spec.name] = array

    path_cells = None
    if desc.path_column is not None:
        table, cells, lines = column_cells(desc.path_column)
        path_cells = {clip: (text, (table.path, line)) for clip, text, line in zip(ids, cells, lines)}
    audio_paths = _resolve_audio(desc, ids, where_of, path_cells, check_audio)
    try:
        tasks = TaskSet(tuple(resolved), name=desc.name, id_column=desc.id_column)
    except TaskError as err:
        raise DescriptionError(f"{desc.spec_path}, key tasks: {err}") from None
    return Corpus(desc.root, ids, np.array(splits, dtype=str), labels, [""] * n,
                  list(dict.fromkeys(t.path for t in tables)), tasks, groups, audio_paths, desc.spec_path)


def _train_range(desc: Description, spec: TaskSpec, train: np.ndarray) -> tuple[float, float]:
    """A regression task's label range when the yaml gives none: the Train labels' min and max (the heads
    predict inside it)."""
    low, high = float(np.nanmin(train)), float(np.nanmax(train))
    if not low < high:
        raise DescriptionError(f"{desc.spec_path}, key tasks.{spec.name}: every Train label is {low:g}; a regression "
                               f"task needs varying values (or give range: [low, high])")
    return low, high


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def open_corpus(root: str | os.PathLike | None = None, spec: str | os.PathLike | None = None, *,
                check_audio: bool = False) -> Corpus:
    """The corpus every command reads: `spec` if given, else `root/corpus.yaml` if present (or `root` itself
    when it is a .yaml file), else the A-VB layout at `root`."""
    if spec is not None:
        return read_described_corpus(spec, check_audio=check_audio)
    if root is None:
        raise DescriptionError("no corpus given: name a corpus folder or a corpus.yaml")
    root = Path(root)
    if root.is_file() and root.suffix.lower() in (".yaml", ".yml"):
        return read_described_corpus(root, check_audio=check_audio)
    if (root / SPEC_FILE).is_file():
        return read_described_corpus(root / SPEC_FILE, check_audio=check_audio)
    return read_corpus(root, check_audio=check_audio)


# ---------------------------------------------------------------------------------------------- drafting

_GROUP_HINTS = ("speaker", "actor", "subject", "spk", "participant", "talker")
_MAX_CLASSES = 50


def _yaml_str(text: str) -> str:
    """A string as YAML reads it back unchanged (plain when safe, else JSON-quoted, which YAML accepts)."""
    from yaml import safe_load

    if re.fullmatch(r"[A-Za-z0-9_./][A-Za-z0-9_./-]*", text) and safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _task_name(column: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", column).strip("_") or "task"
    if not name[0].isalpha():
        name = "t_" + name
    name = name[:60]
    base, k = name, 2
    while name.lower() in taken or name.lower() == "mean":
        name, k = f"{base}_{k}", k + 1
    taken.add(name.lower())
    return name


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return path.resolve().as_posix()


@dataclass
class Draft:
    """What `draft_description` guessed: the yaml text and one line per decision."""

    text: str
    decisions: list[str]


def draft_description(labels: str | os.PathLike, audio: str | os.PathLike, out: str | os.PathLike) -> Draft:
    """Guess a corpus.yaml (written to `out` later) from one label CSV and the audio folder."""
    labels, audio, out = Path(labels), Path(audio), Path(out)
    if not labels.is_file():
        raise DescriptionError(f"{labels}: no such file")
    if not audio.is_dir():
        raise DescriptionError(f"{audio}: {'not a folder' if audio.exists() else 'no such audio folder'}")
    table = _read_table(labels)
    if not table.rows:
        raise DescriptionError(f"{labels}: no rows below the header")
    n = len(table.rows)
    cells = {name: [row[col] for _, row in table.rows] for name, col in table.columns.items()}
    stems: set[str] = set()
    with os.scandir(audio) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if not entry.name.startswith(".") and ext.lower() in AUDIO_EXTENSIONS and entry.is_file():
                stems.add(stem)
    decisions: list[str] = []

    unique = [c for c, v in cells.items() if all(v) and len(set(v)) == n]
    by_stem = {c: sum(v in stems for v in cells[c]) for c in unique}
    id_column = max(unique, key=lambda c: by_stem[c], default=None)
    path_column = None
    if id_column is None or by_stem[id_column] == 0:
        # no id matches a file name: a column of relative paths to the audio files?
        by_path = {c: sum((audio / v).is_file() for v in cells[c]) for c in unique
                   if any("." in v or "/" in v for v in cells[c][:20])}
        path_column = max(by_path, key=lambda c: by_path[c], default=None)
        if path_column is None or by_path[path_column] == 0:
            example = f" (e.g. {min(stems)!r})" if stems else " (it holds no audio files)"
            raise DescriptionError(f"{labels}: no column holds unique values that match the audio file names in "
                                   f"{audio}{example}; the id column must hold each clip's file name without "
                                   f"its extension")
        others = [c for c in unique if c != path_column]
        id_column = next((c for c in others if c.lower() in ("id", "file_id", "clip", "clip_id")),
                         others[0] if others else path_column)
        decisions.append(f"path column: {path_column} ({by_path[path_column]} of {n} values are audio files "
                         f"in {audio})")
        decisions.append(f"id column: {id_column}")
    else:
        decisions.append(f"id column: {id_column} ({by_stem[id_column]} of {n} values match audio files in "
                         f"{audio})")
    used = {id_column, path_column} - {None}

    split_column = None
    candidates = [c for c in cells if c not in used and any(cells[c])
                  and all(v.strip().lower() in _SPLIT_NAMES for v in cells[c] if v)]
    if candidates:
        split_column = next((c for c in candidates if c.lower() == "split"), candidates[0])
        counts = Counter(_SPLIT_NAMES.get(v.strip().lower(), "") for v in cells[split_column])
        decisions.append(f"split column: {split_column} ("
                         + ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS) + ")")
        used.add(split_column)
    else:
        decisions.append("split column: none (every row is Train; folds are made at stage 2)")

    def numeric(column: str) -> bool:
        values = [v for v in cells[column] if v]
        parsed = [_number(v) for v in values]
        return bool(values) and all(p is not None and math.isfinite(p) for p in parsed)

    def is_classes(column: str) -> bool:
        distinct = len({v for v in cells[column] if v})
        return 2 <= distinct <= _MAX_CLASSES and distinct < n / 2

    group_column = next((c for c in cells if c not in used and any(h in c.lower() for h in _GROUP_HINTS)
                         and any(cells[c])), None)
    if group_column is None:  # a text column with repeated values but too many distinct ones to be classes
        group_column = next((c for c in cells if c not in used and not numeric(c) and not is_classes(c)
                             and any(cells[c]) and len({v for v in cells[c] if v}) < n), None)
    if group_column is not None:
        decisions.append(f"group column: {group_column} ({len({v for v in cells[group_column] if v})} groups)")
        used.add(group_column)
    else:
        decisions.append("group column: none")

    taken: set[str] = set()
    tasks: list[tuple[str, str, str]] = []  # (name, kind, column)
    for column, values in cells.items():
        if column in used:
            continue
        distinct = {v for v in values if v}
        if numeric(column) and len(distinct) == n and all(float(v).is_integer() for v in distinct):
            decisions.append(f"column {column}: not used (a different integer on every row: an index?)")
        elif numeric(column):
            name = _task_name(column, taken)
            tasks.append((name, "regression", column))
            note = ""
            if len(distinct) <= 10 and all(float(v).is_integer() for v in distinct):
                note = (f"; it holds {len(distinct)} distinct integers: make it kind: classification if they "
                        f"are categories")
            decisions.append(f"task {name}: regression, column {column}{note}")
        elif is_classes(column):
            name = _task_name(column, taken)
            tasks.append((name, "classification", column))
            decisions.append(f"task {name}: classification, column {column} ({len(distinct)} classes)")
        else:
            why = "empty" if not distinct else f"{len(distinct)} distinct values, neither numbers nor few classes"
            decisions.append(f"column {column}: not used ({why})")
    if not tasks:
        raise DescriptionError(f"{labels}: no column looks like a label (numbers, or 2 to {_MAX_CLASSES} distinct "
                               f"values repeated across rows)")

    base = out.parent
    lines = [f"# Drafted by `avb corpus init` from {labels.name}; check every guess, then run `avb corpus check`.",
             f"name: {_yaml_str(base.resolve().name or 'corpus')}",
             f"audio: {_yaml_str(_relative(audio, base))}"]
    if path_column is not None:
        lines.append(f"path: {_yaml_str(path_column)}")
    lines += [f"labels: {_yaml_str(_relative(labels, base))}",
              f"id: {_yaml_str(id_column)}"]
    if split_column is not None:
        lines.append(f"split: {_yaml_str(split_column)}")
    if group_column is not None:
        lines.append(f"group: {_yaml_str(group_column)}")
    lines.append("tasks:")
    for name, kind, column in tasks:
        lines.append(f"  {_yaml_str(name)}: {{kind: {kind}, columns: [{_yaml_str(column)}]}}")
    return Draft("\n".join(lines) + "\n", decisions)


def write_draft(labels: str | os.PathLike, audio: str | os.PathLike, out: str | os.PathLike, *,
                force: bool = False) -> Draft:
    """Draft a description and write it to `out` (never over an existing file unless `force`)."""
    from cache.command_kit.atomic import write_text_atomic

    out = Path(out)
    if out.exists() and not force:
        raise DescriptionError(f"{out}: already exists (use --force to overwrite it)")
    if out.is_dir():
        raise DescriptionError(f"{out}: is a directory; name the file to write, e.g. {out / SPEC_FILE}")
    if not out.parent.is_dir():
        raise DescriptionError(f"{out.parent}: no such folder")
    draft = draft_description(labels, audio, out)
    write_text_atomic(out, draft.text)
    return draft

