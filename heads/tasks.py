"""What a corpus asks a model to predict: its tasks, their kinds, columns and classes, and the scores they give.

A `TaskSet` is the one description every stage reads -- the corpus reader, the dump (which stores it in the
cache's attributes), the heads, losses, weightings, metrics, tables, ensembles and predictions -- so nothing
downstream assumes a corpus. `AVB` is the built-in description of the A-VB 2022 challenge (`avb-format.md`:
Culture's four `_Surprise` columns come last, country names contain spaces); a cache or run folder that
predates task descriptions is read as A-VB.

Scores: a classification task's headline is UAR (accuracy and macro-F1 beside it), a regression task's is the
mean CCC over its columns (Pearson beside it); model selection is the mean of the headline scores.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cache.command_kit.errors import AvbError

EMOTIONS: tuple[str, ...] = (
    "Awe", "Excitement", "Amusement", "Awkwardness", "Fear",
    "Horror", "Distress", "Triumph", "Sadness", "Surprise",
)
COUNTRIES: tuple[str, ...] = ("China", "United States", "South Africa", "Venezuela")
TYPE_CLASSES: tuple[str, ...] = ("Gasp", "Laugh", "Cry", "Scream", "Grunt", "Groan", "Pant", "Other")
SPLITS: tuple[str, ...] = ("Train", "Val", "Test")
KINDS: tuple[str, ...] = ("classification", "regression")
# Model selection (the paper's): the mean of the headline scores, under this key in every metrics file.
SELECTION_KEY = "mean"
# A task name becomes a metric key prefix, a file name and a module key: letters, digits, '_' and '-'.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}$")

# 9 emotions per country (Surprise left out), country by country, then the four Surprise columns.
_CULTURE_COLUMNS = tuple(
    f"{country}_{emotion}" for country in COUNTRIES for emotion in EMOTIONS if emotion != "Surprise"
) + tuple(f"{country}_Surprise" for country in COUNTRIES)


class TaskError(AvbError):
    """An unknown task name, a bad task order or a task description that cannot work."""


@dataclass(frozen=True)
class Task:
    """One task: `columns` are its label columns; a classification task has one column holding a class name,
    and `classes` lists the names in the index order the models use. `title`, `file_stem` and `info_csv`
    belong to the A-VB description (Table I titles, submission and label file names)."""

    name: str
    kind: Literal["classification", "regression"]
    columns: tuple[str, ...]
    classes: tuple[str, ...] = ()
    low: float = 0.0    # a regression task's label range: the heads predict low + (high - low) * sigmoid(.)
    high: float = 1.0   # (the corpus description's `range`, else the Train labels' min and max)
    title: str = ""
    file_stem: str = ""
    info_csv: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if not self.title:
            object.__setattr__(self, "title", self.name)

    @property
    def unit_range(self) -> bool:
        """Whether the labels already live in [0, 1] (A-VB), so outputs are the sigmoid itself."""
        return self.low == 0.0 and self.high == 1.0

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def metric(self) -> str:
        """The headline metric: 'uar' for classification, 'ccc' for regression."""
        return "uar" if self.is_classification else "ccc"

    @property
    def headline_key(self) -> str:
        return f"{self.name}_{self.metric}"

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """This task's keys in every metrics file, headline first."""
        if self.is_classification:
            return (f"{self.name}_uar", f"{self.name}_accuracy", f"{self.name}_f1")
        return (f"{self.name}_ccc", f"{self.name}_pearson")

    @property
    def out_dim(self) -> int:
        """Width of a model's output for this task (logits for classification, one value per column otherwise)."""
        return len(self.classes) if self.is_classification else len(self.columns)

    @property
    def label_dim(self) -> int:
        """Width of the stored label array: the class index for classification, one value per column otherwise."""
        return 1 if self.is_classification else len(self.columns)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "columns": list(self.columns)}
        if self.is_classification:
            out["classes"] = list(self.classes)
        else:
            out["range"] = [self.low, self.high]
        return out


@dataclass(frozen=True)
class TaskSet:
    """The ordered tasks of one corpus (the order is the default classifier-chain order) and its name.

    `builtin` is 'avb' for the A-VB description; everything A-VB-specific (bracketed ids, Country, the four
    official submission files, Table I's titles) is done only where it is set."""

    tasks: tuple[Task, ...]
    name: str = ""
    builtin: str = ""
    id_column: str = "id"     # the id column of the corpus's label CSV, and of the prediction files
    _by_name: dict[str, Task] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise TaskError("a corpus needs at least one task")
        by_name: dict[str, Task] = {}
        for task in self.tasks:
            if not isinstance(task.name, str) or not _NAME.match(task.name):
                raise TaskError(f"task name {task.name!r} must start with a letter and hold only letters, digits, "
                                f"'_' and '-' (at most 64)")
            if task.name.lower() in by_name or task.name.lower() == SELECTION_KEY:
                raise TaskError(f"task name {task.name!r} is used twice or is reserved")
            if task.kind not in KINDS:
                raise TaskError(f"task {task.name!r}: kind {task.kind!r} must be one of {', '.join(KINDS)}")
            if not task.columns:
                raise TaskError(f"task {task.name!r} names no columns")
            if task.is_classification:
                if len(task.columns) != 1:
                    raise TaskError(f"classification task {task.name!r} must name exactly one column, "
                                    f"got {len(task.columns)}")
                if len(task.classes) < 2 or len(set(task.classes)) != len(task.classes):
                    raise TaskError(f"classification task {task.name!r} needs at least two distinct classes, "
                                    f"got {list(task.classes)}")
            elif task.classes:
                raise TaskError(f"regression task {task.name!r} cannot list classes")
            elif not (math.isfinite(task.low) and math.isfinite(task.high) and task.low < task.high):
                raise TaskError(f"regression task {task.name!r}: range [{task.low:g}, {task.high:g}] must be two "
                                f"finite numbers, low < high")
            by_name[task.name.lower()] = task
        object.__setattr__(self, "_by_name", by_name)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_name

    def __getitem__(self, name: str) -> Task:
        return self.get(name)

    def get(self, name: str) -> Task:
        """A task by name (any case), with an error that lists the valid ones."""
        try:
            return self._by_name[name.lower()]
        except (KeyError, AttributeError):
            raise TaskError(f"unknown task {name!r}; expected one of {', '.join(self.names)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def is_avb(self) -> bool:
        return self.builtin == "avb"

    @property
    def title(self) -> str:
        return self.name or "corpus"

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Keys of every metrics file and of `avb score --json`, in the order tables print them."""
        return tuple(key for task in self.tasks for key in task.metric_keys)

    @property
    def headline_keys(self) -> dict[str, str]:
        """Task name -> its headline score's key (what model selection and the tables use)."""
        return {t.name: t.headline_key for t in self.tasks}

    def parse_order(self, text: str | Sequence[str]) -> tuple[str, ...]:
        """A chain order ('a,b,c' or a sequence): a permutation of the tasks."""
        parts = text.split(",") if isinstance(text, str) else list(text)
        order = tuple(self.get(part.strip()).name for part in parts if part.strip())
        if sorted(order) != sorted(self.names):
            shown = text if isinstance(text, str) else ",".join(text)
            raise TaskError(f"task order {shown!r} must name each of {', '.join(self.names)} exactly once")
        return order

    def to_json(self) -> dict[str, Any]:
        """What the cache's `tasks` attribute and a run's config hold."""
        out: dict[str, Any] = {"name": self.name, "id_column": self.id_column,
                               "tasks": [t.to_json() for t in self.tasks]}
        if self.builtin:
            out["builtin"] = self.builtin
        return out

    @classmethod
    def from_json(cls, data: Any, *, where: str = "task description") -> TaskSet:
        """The inverse of to_json; None (a cache or run from before task descriptions) is A-VB."""
        if data is None:
            return AVB
        try:
            if data.get("builtin") == "avb":
                return AVB
            tasks = tuple(Task(str(t["name"]), t["kind"], tuple(map(str, t["columns"])),
                               tuple(map(str, t.get("classes", ()))), *t.get("range", (0.0, 1.0)))
                          for t in data["tasks"])
            return cls(tasks, name=str(data.get("name") or ""), id_column=str(data.get("id_column") or "id"))
        except TaskError as err:
            raise TaskError(f"{where}: {err}") from None
        except (AttributeError, KeyError, TypeError) as err:
            raise TaskError(f"{where}: not a task description ({type(err).__name__}: {err})") from None

    def label_meta(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Label name -> columns and label name -> classes, as the cache stores them on each label dataset."""
        return ({t.name: list(t.columns) for t in self.tasks},
                {t.name: list(t.classes) for t in self.tasks if t.is_classification})


def select_scores(scores: Mapping[str, float], tasks: TaskSet) -> float | None:
    """The model-selection score (mean of the headline scores), or None when a task's headline is missing."""
    values = [scores.get(key) for key in tasks.headline_keys.values()]
    if any(not isinstance(v, (int, float)) for v in values):
        return None
    return float(sum(values) / len(values))  # type: ignore[arg-type]


def tasks_of(attrs: Mapping[str, Any], where: str = "cache") -> TaskSet:
    """The tasks a cache (its attributes) or a run (its recorded cache attributes) was made for; A-VB for one
    written before task descriptions existed."""
    return TaskSet.from_json(attrs.get("tasks"), where=f"{where}: attribute 'tasks'")


def _avb(name: str, kind: str, columns: tuple[str, ...], classes: tuple[str, ...], stem: str) -> Task:
    return Task(name, kind, columns, classes, title=f"A-VB-{stem.upper()}", file_stem=stem,  # type: ignore[arg-type]
                info_csv=f"{name}_info.csv")


AVB = TaskSet((
    _avb("type", "classification", ("Voc_Type",), TYPE_CLASSES, "Type"),
    _avb("two", "regression", ("Valence", "Arousal"), (), "Two"),
    _avb("high", "regression", EMOTIONS, (), "High"),
    _avb("culture", "regression", _CULTURE_COLUMNS, (), "Culture"),
), name="A-VB", builtin="avb", id_column="File_ID")
