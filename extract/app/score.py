"""`avb score`: score prediction CSVs against a corpus's labels (A-VB: the official submission files; any other
corpus: `<task>.csv` files as the runs write them)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from heads.analysis.bootstrap import (
    DEFAULT_N_BOOT,
    BootstrapConfig,
    score_intervals,
    with_intervals,
)
from heads.metrics import score_task
from heads.submission import bracket_id, read_submission
from heads.tasks import SPLITS, TaskSet


class ScoreError(AvbError):
    """Prediction files that cannot be scored against the split; one line naming the file."""


def read_split_predictions(corpus, split: str, paths: Sequence[Path]
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labels, predictions) per task of the given submission files, both in the split's row order.

    Every id of the split must be predicted exactly once and no other id may appear; one file per task.
    Putting every task in the same clip order is what lets a bootstrap resample the clips once for all tasks.
    """
    rows = corpus.indices(split)
    expected = {corpus.ids[i]: k for k, i in enumerate(rows)}
    seen_tasks: dict[str, Path] = {}
    labels: dict[str, np.ndarray] = {}
    preds: dict[str, np.ndarray] = {}
    for path in paths:
        task, ids, values = read_submission(path, corpus.tasks)
        if task.name in seen_tasks:
            raise ScoreError(f"{path}: a second {task.title} file (first: {seen_tasks[task.name]})")
        seen_tasks[task.name] = path
        extra = [i for i in ids if i not in expected]
        if extra:
            raise ScoreError(f"{path}: File_ID {bracket_id(extra[0])} is not in the {split} split "
                             f"({len(extra)} such ids)")
        missing = sorted(set(expected) - set(ids))
        if missing:
            raise ScoreError(f"{path}: File_ID {bracket_id(missing[0])} of the {split} split has no prediction "
                             f"({len(missing)} missing)")
        order = np.empty(len(rows), dtype=np.int64)
        order[[expected[i] for i in ids]] = np.arange(len(ids))
        task_labels = corpus.labels[task.name][rows]
        if np.isnan(task_labels).all():
            raise ScoreError(f"{split} split has no {task.title} labels to score against (is it Test?)")
        labels[task.name], preds[task.name] = task_labels, np.asarray(values)[order]
    return labels, preds


def score_files(corpus, split: str, paths: Sequence[Path]) -> dict[str, float]:
    """Scores of the given submission files on `split` of `corpus`, rows matched by File_ID."""
    return score_predictions(corpus.tasks, *read_split_predictions(corpus, split, paths))


def score_predictions(tasks: TaskSet, labels: dict[str, np.ndarray], preds: dict[str, np.ndarray]
                      ) -> dict[str, float]:
    """The metric keys of the tasks present, in `tasks.metric_keys` order (no `mean`: a subset of tasks is
    allowed)."""
    scores: dict[str, float] = {}
    for task in tasks:
        if task.name in preds:
            scores.update(score_task(task, labels[task.name], preds[task.name]))
    return {key: scores[key] for key in tasks.metric_keys if key in scores}


def format_scores(tasks: TaskSet, scores: dict[str, Any], level: float | None = None) -> str:
    """The printed table; with `level`, a column of the `<key>_ci` intervals."""
    ci_head = f"{f'{level:.0%} CI':>20}" if level is not None else ""
    width = max([14] + [len(t.title) + 2 for t in tasks])
    lines = [f"{'task':<{width}}{'metric':<10}{'score':>8}{ci_head}"]
    for task in tasks:
        for key in task.metric_keys:
            if key in scores:
                line = f"{task.title:<{width}}{key[len(task.name) + 1:].upper():<10}{scores[key]:>8.4f}"
                if level is not None and f"{key}_ci" in scores:
                    low, high = scores[f"{key}_ci"]
                    line += f"{f'[{low:.4f}, {high:.4f}]':>20}"
                lines.append(line)
    return "\n".join(lines)


@click.command("score")
@click.option("--corpus", "root", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root: with a corpus.yaml, or in the official A-VB layout (labels/ and audio/wav/).")
@click.option("--spec", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The corpus.yaml describing the corpus, when it is not <corpus>/corpus.yaml.")
@click.option("--split", default="Val", show_default=True, type=click.Choice(SPLITS[:2]),
              help="Split whose labels the predictions are scored against.")
@click.option("--ci", "level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Add a percentile-bootstrap confidence interval at this level (e.g. 0.95) to every score: "
                   "the split's clips resampled with replacement, the same resamples for every task.")
@click.option("--n-boot", default=DEFAULT_N_BOOT, show_default=True, type=click.IntRange(min=1),
              help="Bootstrap resamples (with --ci).")
@click.option("--seed", default=BootstrapConfig.seed, show_default=True,
              help="Seed of the bootstrap resamples (with --ci).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON (with --ci: <score>_ci = [low, high]).")
@click.argument("predictions", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def score_command(root: Path | None, spec: Path | None, split: str, level: float | None, n_boot: int, seed: int,
                  as_json: bool, predictions: tuple[Path, ...]) -> None:
    """Score PREDICTIONS (one file per task, any subset of the tasks, any row order; A-VB: the official
    submission CSVs)."""
    from extract.description import open_corpus

    if root is None and spec is None:   # a usage error, as `avb corpus check` gives without ROOT or --spec
        raise click.UsageError("Missing option '--corpus'.")
    with command_errors():
        corpus = open_corpus(root, spec)
        labels, preds = read_split_predictions(corpus, split, predictions)
        scores: dict[str, Any] = score_predictions(corpus.tasks, labels, preds)
        if level is not None:
            config = BootstrapConfig(level=level, n_boot=n_boot, seed=seed)
            scores = with_intervals(scores, score_intervals(corpus.tasks, labels, preds, config))
    click.echo(json.dumps(scores, indent=2) if as_json else format_scores(corpus.tasks, scores, level))
