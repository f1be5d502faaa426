"""Uncertainty of an ablation grid: bootstrap intervals of every run's Val scores, and a paired bootstrap of
each configuration against the best one per task.

Computed from what the runs wrote (each run folder's `predictions/val/`, matched to the cache's Val ids), not
inside training: any finished grid can be re-analysed, and the training loop stays as it is. Every run is
scored on the same resamples of the Val clips (in id order, as `avb score --ci` resamples them), which is
what makes the comparison paired: a run that is better only on the clips a resample happens to favour shows
up as a large win fraction for its rival.

A configuration (weighting x architecture) is represented by the run Table I shows for it: its best seed by
Val mean. Per task (and for the mean), the best configuration is the one whose representative scores highest;
for every other one, the fraction of resamples on which it scores higher than the best is reported (ties
count half, so a configuration whose best run predicts exactly like the best one gets 0.5).
That fraction is a one-sided paired-bootstrap p-value for "the best really is better": below .025, the best
wins on more than 97.5 % of redraws of the clips. The best was picked on the same Val clips, so the
comparison flatters it somewhat; a held-out split would not.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.command_kit.errors import AvbError
from heads.analysis.bootstrap import (
    BootstrapConfig,
    percentile_interval,
    score_distributions,
    win_fraction,
)
from heads.analysis.ensemble import read_split_predictions
from heads.metrics import score_text
from heads.runs import predictions_dir
from heads.submission import bracket_id
from heads.tasks import SELECTION_KEY, TaskSet, tasks_of


def compared(tasks: TaskSet) -> tuple[tuple[str, str], ...]:
    """(key, header) of the scores the paired table compares: each task's headline score, then the mean."""
    return tuple((t.headline_key, f"{t.title} {t.metric.upper()}") for t in tasks) + ((SELECTION_KEY, "Mean"),)


def ci_keys(tasks: TaskSet) -> tuple[str, ...]:
    """The scores that get bootstrap intervals: every metric and the mean."""
    return (*tasks.metric_keys, SELECTION_KEY)


class ComparisonError(AvbError):
    """A run folder whose Val predictions cannot be compared (missing, or other clips than the cache's Val)."""


def val_arrays(cache: Any) -> tuple[list[str], dict[str, np.ndarray]]:
    """The cache's Val ids sorted, and every task's labels in that order."""
    rows = np.asarray(cache.indices("Val"))
    order = rows[np.argsort(np.asarray(cache.ids)[rows], kind="stable")]
    labels = {name: np.asarray(cache.labels[name], dtype=np.float64)[order]
              for name in tasks_of(cache.attrs, str(cache.path)).names}
    return [str(i) for i in np.asarray(cache.ids)[order]], labels


def run_distributions(tasks: TaskSet, run_dirs: Sequence[Path], val_ids: Sequence[str],
                      val_labels: dict[str, np.ndarray], config: BootstrapConfig) -> list[dict[str, np.ndarray]]:
    """Per run: score key -> its [n_boot] scores on the shared resamples, from the run's Val prediction files."""
    systems = []
    for run in run_dirs:
        folder = predictions_dir(run, "Val")
        preds = read_split_predictions(folder, tasks)
        if preds is None or sorted(preds.preds) != sorted(tasks.names):
            raise ComparisonError(f"{folder}: the Val predictions of every task are needed for the intervals")
        have, want = set(preds.ids), set(val_ids)
        if have != want:
            odd = sorted(want - have) or sorted(have - want)
            where = "the cache but not the predictions" if odd[0] in want else "the predictions but not the cache"
            raise ComparisonError(f"{folder}: Val File_ID {bracket_id(odd[0])} is in {where}")
        systems.append(preds.reindexed(val_ids))
    return score_distributions(tasks, val_labels, systems, config)


def add_uncertainty(rows: list[dict[str, Any]], summary: list[dict[str, Any]], run_dirs: Sequence[Path], cache: Any,
                    config: BootstrapConfig, varied: Sequence[str] = ()) -> dict[str, Any]:
    """Add `<key>_ci` to every row, and `best_ci` / `win_fraction` to every summary entry (in place).

    Returns what results.json records about it: the bootstrap settings and the best configuration per key.
    """
    if len(rows) != len(run_dirs):
        raise ComparisonError(f"{len(rows)} result rows but {len(run_dirs)} run folders")
    tasks = tasks_of(cache.attrs, str(cache.path))
    keys = ci_keys(tasks)
    val_ids, val_labels = val_arrays(cache)
    dists = run_distributions(tasks, run_dirs, val_ids, val_labels, config)
    for row, dist in zip(rows, dists):
        for key in keys:
            row[f"{key}_ci"] = percentile_interval(dist[key], config.level)
    index = {(r["weighting"], r["arch"], r["seed"], *(r[n] for n in varied)): i for i, r in enumerate(rows)}
    reps = [index[(s["weighting"], s["arch"], s["best_seed"], *(s["vary"][n] for n in varied))] for s in summary]
    best: dict[str, str] = {}
    for entry, r in zip(summary, reps):
        entry["best_ci"] = {key: rows[r][f"{key}_ci"] for key in keys}
        entry["win_fraction"] = {}
    for key, _ in compared(tasks):
        top = max(range(len(summary)), key=lambda j: (summary[j]["best"][key], -j))   # ties: the first entry
        best[key] = _label(summary[top], varied)
        for j, entry in enumerate(summary):
            entry["win_fraction"][key] = (None if j == top
                                          else win_fraction(dists[reps[j]][key], dists[reps[top]][key]))
    return {**config.to_dict(), "n_val_clips": len(val_ids), "best": best}


def _fraction(x: float | None) -> str:
    return "best" if x is None else score_text(x, 3)


def _label(entry: dict[str, Any], varied: Sequence[str]) -> str:
    """A configuration's name: `weighting-arch` and the values of the axes that apply to it."""
    values = entry.get("vary", {})
    return f"{entry['weighting']}-{entry['arch']}" + "".join(
        f"-{name}={values[name]}" for name in varied if values.get(name, "") != "")


def paired_markdown(tasks: TaskSet, summary: Sequence[dict[str, Any]], titles: dict[str, str],
                    varied: Sequence[str] = ()) -> str:
    """The table of win fractions: one row per configuration, one column per task's headline score and the mean."""
    if not summary or "win_fraction" not in summary[0]:
        return ""
    columns = compared(tasks)
    lines = ["| Configuration | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for s in summary:
        cells = [_fraction(s["win_fraction"][key]) for key, _ in columns]
        axes = ", ".join(f"{n}={s['vary'][n]}" for n in varied if s["vary"][n] != "")
        lines.append(f"| {titles[s['weighting']]} · {s['arch'].upper()}{f' {axes}' if axes else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
