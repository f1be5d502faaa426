"""Speaker-independent cross-validation at stage 2, from one dump: `avb heads ablate --folds K`.

The cache's clips are put in K group-disjoint folds (`heads.training.folds.plan_folds`: by the cache's
`clip_info/group`, stratified by the first classification task). Round k is the ordinary grid on a view of the
cache whose splits say Train (the other folds), Val (fold k+1: best epoch and LR plateau) and Test (fold k),
written to `OUT/fold-k/` with its own tables; fold k is predicted by heads that neither trained nor selected
on it. Once every round is done, OUT gets:

    folds.csv        id, group, fold of every clip
    crossval.csv     one row per run and round: its scores on the round's evaluation fold
    crossval.json    the same, the mean and sample std over rounds, and the pooled out-of-fold scores
    crossval.md      per run: mean ± std over rounds of each headline score, and the pooled out-of-fold
                     score with its bootstrap interval (whole groups resampled)

The pooled scores join every round's evaluation-fold predictions, so each clip is predicted exactly once.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from cache.command_kit.atomic import write_json_atomic, write_text_atomic
from heads.analysis.bootstrap import BootstrapConfig, score_intervals
from heads.analysis.ensemble import read_split_predictions
from heads.metrics import score_all, score_text
from heads.runs import predictions_dir
from heads.tasks import SELECTION_KEY, TaskSet, tasks_of
from heads.training.folds import FoldError, cache_folds, fold_roles, write_folds_csv

FOLDS_CSV, CROSSVAL_CSV, CROSSVAL_JSON, CROSSVAL_MD = "folds.csv", "crossval.csv", "crossval.json", "crossval.md"


def fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / f"fold-{fold}"


def plan(cache: Any, k: int, fold: int | None, seed: int) -> tuple[np.ndarray, list[int]]:
    """(folds, the rounds to run); checks K and the round before anything trains."""
    fold_roles(0 if fold is None else fold, k)   # refuses K < 3 and a round outside 0..K-1
    folds = cache_folds(cache, k, seed)
    return folds, list(range(k)) if fold is None else [int(fold)]


def write_folds(out: Path, cache: Any, folds: np.ndarray) -> None:
    groups = cache.clip_info.get("group")
    write_folds_csv(Path(out) / FOLDS_CSV, [str(i) for i in cache.ids],
                    [""] * len(cache.ids) if groups is None else [str(g) for g in groups], folds)


# --------------------------------------------------------------------------------------------- summary

def _eval_predictions(tasks: TaskSet, run_dir: Path, ids: list[str]) -> dict[str, np.ndarray]:
    """One run's predictions of its evaluation fold (its predictions/test), in the order of `ids`."""
    folder = predictions_dir(run_dir, "Test")
    preds = read_split_predictions(folder, tasks)
    if preds is None or sorted(preds.preds) != sorted(tasks.names) or sorted(preds.ids) != sorted(ids):
        raise FoldError(f"{folder}: the evaluation fold's predictions of every task are needed for the "
                        "cross-validation tables (rerun the same command)")
    return preds.reindexed(ids)


def write_summary(out: Path, cache: Any, folds: np.ndarray, k: int, run_names: list[str],
                  bootstrap: BootstrapConfig | None) -> dict[str, Any]:
    """crossval.csv/.json/.md from the runs of every round (see the module docstring); returns the JSON."""
    tasks = tasks_of(cache.attrs, str(cache.path))
    ids = np.asarray(cache.ids).astype(str)
    keys = (*tasks.metric_keys, SELECTION_KEY)
    per_round: list[dict[str, Any]] = []
    pooled_preds: dict[str, dict[str, list[np.ndarray]]] = {name: {t: [] for t in tasks.names} for name in run_names}
    pooled_rows: list[np.ndarray] = []
    for fold in range(k):
        rows = np.flatnonzero(folds == fold)
        pooled_rows.append(rows)
        labels = {name: np.asarray(cache.labels[name], dtype=np.float64)[rows] for name in tasks.names}
        for name in run_names:
            preds = _eval_predictions(tasks, fold_dir(out, fold) / name, ids[rows].tolist())
            scores = score_all(tasks, labels, preds)
            per_round.append({"run": name, "fold": fold, **{key: float(scores[key]) for key in keys}})
            for task in tasks.names:
                pooled_preds[name][task].append(preds[task])
    order = np.concatenate(pooled_rows)
    labels = {name: np.asarray(cache.labels[name], dtype=np.float64)[order] for name in tasks.names}
    groups = cache.clip_info.get("group")
    codes = np.unique(np.asarray(groups)[order] if groups is not None else order, return_inverse=True)[1]
    summary = []
    for name in run_names:
        preds = {task: np.concatenate(parts) for task, parts in pooled_preds[name].items()}
        pooled = score_all(tasks, labels, preds)
        entry: dict[str, Any] = {
            "run": name,
            "mean": {key: float(np.mean([r[key] for r in per_round if r["run"] == name])) for key in keys},
            "std": {key: float(np.std([r[key] for r in per_round if r["run"] == name], ddof=1)) if k > 1 else None
                    for key in keys},
            "pooled": {key: float(pooled[key]) for key in keys}}
        if bootstrap is not None:
            entry["pooled_ci"] = score_intervals(tasks, labels, preds, bootstrap, groups=codes)
        summary.append(entry)
    record = {"folds": k, "n_clips": int(len(order)), "n_groups": int(codes.max()) + 1, "rounds": per_round,
              "summary": summary, **({"bootstrap": {**bootstrap.to_dict(), "resampled": "groups"}}
                                     if bootstrap is not None else {})}
    write_text_atomic(out / CROSSVAL_CSV, _csv(per_round, keys))
    write_json_atomic(out / CROSSVAL_JSON, record)
    write_text_atomic(out / CROSSVAL_MD, _markdown(tasks, record))
    return record


def _csv(per_round: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run", "fold", *keys], lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_round)
    return buf.getvalue()


def _markdown(tasks: TaskSet, record: dict[str, Any]) -> str:
    keys = [*tasks.headline_keys.values(), SELECTION_KEY]
    heads = [f"{t.title} {t.metric.upper()}" for t in tasks] + ["Mean"]
    lines = ["| Run | " + " | ".join(heads) + " |", "|---|" + "---|" * len(keys)]
    for s in record["summary"]:
        cells = []
        for key in keys:
            text = f"{score_text(s['mean'][key])} ± {score_text(s['std'][key])}" if s["std"][key] is not None \
                else score_text(s["mean"][key])
            text += f"; pooled {score_text(s['pooled'][key])}"
            if "pooled_ci" in s and key in s["pooled_ci"]:
                low, high = s["pooled_ci"][key]
                text += f" [{score_text(low)}, {score_text(high)}]"
            cells.append(text)
        lines.append(f"| {s['run']} | " + " | ".join(cells) + " |")
    note = (f"Speaker-independent {record['folds']}-fold cross-validation over {record['n_clips']} clips of "
            f"{record['n_groups']} groups. Each cell: mean ± sample std over the rounds of the score on the round's "
            "evaluation fold (never trained or selected on), then the pooled out-of-fold score")
    if "bootstrap" in record:
        b = record["bootstrap"]
        note += f" with its {b['level']:.0%} bootstrap interval ({b['n_boot']} resamples of whole groups)"
    return "\n".join(lines) + "\n\n" + note + ".\n"
