"""Metrics: UAR (with accuracy and macro-F1) for classification tasks, CCC and Pearson's r for regression tasks.

Computed as the A-VB challenge computes them (`avb-format.md`): CCC with population (1/N) moments per column,
then the plain mean over a task's columns; UAR as the mean recall over the classes that occur in the ground
truth (macro-F1 averages over the same classes). Everything is computed in float64 so a score does not depend
on the dtype a model produced.

Label convention used across the project: `labels[task]` is a float array of shape [N, task.label_dim] with
NaN where unknown; a classification task holds the class index. Predictions: `preds[task]` is [N, k] for
regression tasks and, for classification, either class indices [N] / [N, 1] or scores [N, n_classes]
(probabilities or logits; the arg-max is taken).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cache.command_kit.errors import AvbError
from heads.tasks import SELECTION_KEY, Task, TaskSet

EPS = 1e-12  # keeps CCC/Pearson finite when both inputs are constant


class MetricsError(AvbError):
    """Nothing to score: a split without labels for a task."""


def _as_columns(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def ccc_per_column(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Concordance correlation coefficient of each column, population moments (1/N)."""
    t, p = _as_columns(y_true), _as_columns(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"CCC needs equal shapes, got labels {t.shape} and predictions {p.shape}")
    mt, mp = t.mean(0), p.mean(0)
    vt, vp = t.var(0), p.var(0)
    cov = ((t - mt) * (p - mp)).mean(0)
    return 2.0 * cov / (vt + vp + (mt - mp) ** 2 + EPS)


def pearson_per_column(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson's r of each column; 0 where either side is constant (r is undefined there)."""
    t, p = _as_columns(y_true), _as_columns(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"Pearson needs equal shapes, got labels {t.shape} and predictions {p.shape}")
    tc, pc = t - t.mean(0), p - p.mean(0)
    denom = np.sqrt((tc**2).sum(0) * (pc**2).sum(0))
    return np.where(denom > EPS, (tc * pc).sum(0) / np.maximum(denom, EPS), 0.0)


def uar(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted average recall over the classes present in `y_true` (the challenge's definition).

    Equals sklearn's macro recall whenever every predicted class also occurs in the ground truth; unlike
    sklearn it does not count a class that is only predicted as a zero-recall class.
    """
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"UAR needs equal lengths, got {t.shape[0]} labels and {p.shape[0]} predictions")
    if t.size == 0:
        raise MetricsError("UAR of an empty set is undefined")
    recalls = [float(np.mean(p[t == c] == c)) for c in np.unique(t)]
    return float(np.mean(recalls))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes present in `y_true` (the classes UAR averages over); F1 = 0 for a class never
    predicted correctly."""
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.size == 0:
        raise MetricsError("F1 of an empty set is undefined")
    scores = []
    for c in np.unique(t):
        tp = float(np.sum((p == c) & (t == c)))
        denom = float(np.sum(p == c) + np.sum(t == c))
        scores.append(2.0 * tp / denom)
    return float(np.mean(scores))


def class_indices(pred: np.ndarray) -> np.ndarray:
    """Class indices from classification predictions given as indices ([N] or [N, 1]) or class scores ([N, C])."""
    pred = np.asarray(pred)
    if pred.ndim == 2 and pred.shape[1] > 1:
        return pred.argmax(1)
    return pred.reshape(-1).astype(np.int64)


def labelled_rows(task: Task, labels: np.ndarray) -> np.ndarray:
    """Boolean mask of rows whose labels for `task` are all known."""
    labels = _as_columns(labels)
    return ~np.isnan(labels).any(axis=1)


def score_task(task: Task, labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """The challenge metrics of one task, on the rows whose labels are known.

    Returns {"<task>_uar", "<task>_accuracy", "<task>_f1"} for a classification task and {"<task>_ccc",
    "<task>_pearson"} for a regression task (`task.metric_keys`).
    """
    keep = labelled_rows(task, labels)
    if not keep.any():
        raise MetricsError(f"no labelled rows to score {task.title} on")
    y = _as_columns(labels)[keep]
    if task.is_classification:
        truth, guess = y[:, 0], class_indices(np.asarray(preds)[keep])
        return {f"{task.name}_uar": uar(truth, guess),
                f"{task.name}_accuracy": float(np.mean(truth.astype(np.int64) == guess)),
                f"{task.name}_f1": macro_f1(truth, guess)}
    p = _as_columns(preds)[keep]
    return {
        f"{task.name}_ccc": float(ccc_per_column(y, p).mean()),
        f"{task.name}_pearson": float(pearson_per_column(y, p).mean()),
    }


def score_all(tasks: TaskSet, labels: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray]
              ) -> dict[str, float]:
    """Scores of every task present in `preds`, plus `mean` of the headline scores when every task is there."""
    out: dict[str, float] = {}
    for task in tasks:
        if task.name in preds:
            out.update(score_task(task, labels[task.name], preds[task.name]))
    headline = [out[k] for k in tasks.headline_keys.values() if k in out]
    if len(headline) == len(tasks):
        out[SELECTION_KEY] = float(np.mean(headline))
    return out


def score_text(value: float | None, digits: int = 4) -> str:
    """A score as the paper prints it: four decimals without the leading zero (.5686, -.0123, 1.0000); '' for
    a missing one. Every table and summary of the tool writes scores through here."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    text = f"{value:.{digits}f}"
    return text.replace("0.", ".", 1) if abs(value) < 1 else text
