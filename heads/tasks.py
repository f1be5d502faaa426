"""The four A-VB 2022 tasks: the one source of truth for columns, classes, losses and metrics.

Everything that names a column -- the corpus reader, the generated corpus, the heads, the scorer and the
submission writer -- reads it from here, so the exact official names and order live in one place
(`avb-format.md`: Culture's four `_Surprise` columns come last, country names contain spaces).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cache.command_kit.errors import AvbError

EMOTIONS: tuple[str, ...] = (
    "Awe", "Excitement", "Amusement", "Awkwardness", "Fear",
    "Horror", "Distress", "Triumph", "Sadness", "Surprise",
)
COUNTRIES: tuple[str, ...] = ("China", "United States", "South Africa", "Venezuela")
TYPE_CLASSES: tuple[str, ...] = ("Gasp", "Laugh", "Cry", "Scream", "Grunt", "Groan", "Pant", "Other")
SPLITS: tuple[str, ...] = ("Train", "Val", "Test")

# 9 emotions per country (Surprise left out), country by country, then the four Surprise columns.
_CULTURE_COLUMNS = tuple(
    f"{country}_{emotion}" for country in COUNTRIES for emotion in EMOTIONS if emotion != "Surprise"
) + tuple(f"{country}_Surprise" for country in COUNTRIES)


class TaskError(AvbError):
    """An unknown task name or a bad task order."""


@dataclass(frozen=True)
class Task:
    """One A-VB task.

    `columns` are the label/submission columns after `File_ID`; for TYPE that is the single `Voc_Type`
    column holding a class name, and `classes` lists the names in the index order the models use.
    """

    name: Literal["type", "two", "high", "culture"]
    title: str          # "A-VB-TYPE", as the paper and challenge write it
    file_stem: str      # submission files are named A-VB-<file_stem>_<team>_<n>.csv
    info_csv: str       # labels/<info_csv> in the official layout
    columns: tuple[str, ...]
    kind: Literal["classification", "regression"]
    metric: Literal["uar", "ccc"]
    classes: tuple[str, ...] = ()

    @property
    def out_dim(self) -> int:
        """Width of a model's output for this task (logits for TYPE, one value per column otherwise)."""
        return len(self.classes) if self.kind == "classification" else len(self.columns)

    @property
    def label_dim(self) -> int:
        """Width of the stored label array: the class index for TYPE, one value per column otherwise."""
        return 1 if self.kind == "classification" else len(self.columns)

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


TYPE = Task("type", "A-VB-TYPE", "Type", "type_info.csv", ("Voc_Type",), "classification", "uar", TYPE_CLASSES)
TWO = Task("two", "A-VB-TWO", "Two", "two_info.csv", ("Valence", "Arousal"), "regression", "ccc")
HIGH = Task("high", "A-VB-HIGH", "High", "high_info.csv", EMOTIONS, "regression", "ccc")
CULTURE = Task("culture", "A-VB-CULTURE", "Culture", "culture_info.csv", _CULTURE_COLUMNS, "regression", "ccc")

# The paper's order (and the default classifier-chain order): TYPE -> TWO -> HIGH -> CULTURE.
TASKS: dict[str, Task] = {t.name: t for t in (TYPE, TWO, HIGH, CULTURE)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)

# Keys of every metrics file and of `avb score --json`, in the order tables print them.
METRIC_KEYS: tuple[str, ...] = (
    "type_uar", "two_ccc", "two_pearson", "high_ccc", "high_pearson", "culture_ccc", "culture_pearson",
)
# The per-task headline score (what model selection and Table I use).
HEADLINE_KEYS: dict[str, str] = {"type": "type_uar", "two": "two_ccc", "high": "high_ccc", "culture": "culture_ccc"}
# Model selection (the paper's): the mean of the headline scores, under this key in every metrics file.
SELECTION_KEY = "mean"


def get_task(name: str) -> Task:
    """Look a task up by its short name, with an error that lists the valid ones."""
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}") from None


def parse_task_order(text: str) -> tuple[str, ...]:
    """Parse a chain order such as 'type,two,high,culture' (a permutation of the four tasks)."""
    order = tuple(get_task(part.strip()).name for part in text.split(",") if part.strip())
    if sorted(order) != sorted(TASK_NAMES):
        raise TaskError(f"task order {text!r} must name each of {', '.join(TASK_NAMES)} exactly once")
    return order
