"""`avb score`: score prediction CSVs in the official submission format against a corpus's labels."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

from heads.metrics import score_task
from heads.submission import bracket_id, read_submission
from heads.tasks import METRIC_KEYS, SPLITS, TASKS


def score_files(corpus, split: str, paths: Sequence[Path]) -> dict[str, float]:
    """Scores of the given submission files on `split` of `corpus`, rows matched by File_ID.

    Every id of the split must be predicted exactly once and no other id may appear; one file per task.
    """
    rows = corpus.indices(split)
    expected = {corpus.ids[i]: i for i in rows}
    seen_tasks: dict[str, Path] = {}
    scores: dict[str, float] = {}
    for path in paths:
        task, ids, values = read_submission(path)
        if task.name in seen_tasks:
            raise ValueError(f"{path}: a second {task.title} file (first: {seen_tasks[task.name]})")
        seen_tasks[task.name] = path
        extra = [i for i in ids if i not in expected]
        if extra:
            raise ValueError(f"{path}: File_ID {bracket_id(extra[0])} is not in the {split} split "
                             f"({len(extra)} such ids)")
        missing = sorted(set(expected) - set(ids))
        if missing:
            raise ValueError(f"{path}: File_ID {bracket_id(missing[0])} of the {split} split has no prediction "
                             f"({len(missing)} missing)")
        positions = np.array([expected[i] for i in ids])
        labels = corpus.labels[task.name][positions]
        if np.isnan(labels).all():
            raise ValueError(f"{split} split has no {task.title} labels to score against (is it Test?)")
        scores.update(score_task(task, labels, values))
    return {key: scores[key] for key in METRIC_KEYS if key in scores}


def format_scores(scores: dict[str, float]) -> str:
    lines = [f"{'task':<14}{'metric':<9}{'score':>8}"]
    for name, task in TASKS.items():
        for key in METRIC_KEYS:
            if key.startswith(name + "_") and key in scores:
                lines.append(f"{task.title:<14}{key.split('_', 1)[1].upper():<9}{scores[key]:>8.4f}")
    return "\n".join(lines)


@click.command("score")
@click.option("--corpus", "root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root in the official layout (labels/ and audio/wav/).")
@click.option("--split", default="Val", show_default=True, type=click.Choice(SPLITS[:2]),
              help="Split whose labels the predictions are scored against.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.argument("predictions", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def score_command(root: Path, split: str, as_json: bool, predictions: tuple[Path, ...]) -> None:
    """Score PREDICTIONS (official submission CSVs, any subset of the four tasks, any row order)."""
    from extract.corpus import read_corpus

    try:
        corpus = read_corpus(root)
        scores = score_files(corpus, split, predictions)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(scores, indent=2) if as_json else format_scores(scores))
