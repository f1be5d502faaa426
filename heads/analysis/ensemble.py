"""`avb ensemble`: combine trained runs into one prediction per task and write the challenge submission.

Three strategies, all chosen on the validation split only (the test labels are hidden):

- `combined` (the paper's Table II "combined"): per task, the single run with the best validation score of
  that task. Its Val score per task is therefore exactly the best member's.
- `mean`: equal-weight average of the top-k runs ranked by their overall validation `mean`.
- `greedy`: Caruana et al. (2004) forward selection *with replacement*, done **per task**: the four tasks are
  scored and submitted separately, so each task gets the member mix that is best for it (a selection on the
  overall mean would trade one task against another for nothing). Starting from the empty set, each round adds
  the run that most improves the task's validation score of the averaged prediction; it stops after `rounds`
  steps or when no addition improves the score strictly. The first step picks the best single run, so the
  result is never worse than the best member on Val (it can overfit Val; that is the known cost of the method).

Regression outputs are averaged with the members' weights; a classification task averages class
probabilities (A-VB: `type_probs.csv`) and takes the arg-max, instead of the reference code's majority vote
over labels. Rows are always matched by id, never by position, and members must come from the same cache
(and so predict the same tasks).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.atomic import write_json_atomic
from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.reader import IncompatibleCache, check_compatible
from heads.analysis.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    BootstrapConfig,
    score_intervals,
    with_intervals,
)
from heads.metrics import score_all
from heads.names import ENSEMBLE_STRATEGIES
from heads.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    RunFolder,
    find_runs,
    members_record,
    predictions_dir,
    read_run,
    write_members,
)
from heads.submission import bracket_id, read_predictions, write_predictions
from heads.tasks import SELECTION_KEY, TaskSet, tasks_of
from heads.training.folds import CV_ROUND, apply_round

STRATEGIES: tuple[str, ...] = ENSEMBLE_STRATEGIES


class EnsembleError(AvbError):
    """A run set that cannot be ensembled; the message names the run, file or id at fault."""


@dataclass
class EnsembleConfig:
    """Settings of one ensemble; defaults reproduce the paper's "combined" submission."""

    strategy: str = "combined"
    top_k: int = 5            # `mean`: how many runs (by overall val mean) to average
    rounds: int = 20          # `greedy`: maximum forward-selection steps per task
    team: str = "avb"
    submission: int = 1
    cache: str | None = None  # overrides the cache named in the runs' config.json (labels only)
    ci: float = DEFAULT_LEVEL  # bootstrap interval level of the Val scores in metrics.json (0: none)
    n_boot: int = DEFAULT_N_BOOT


@dataclass
class SplitPredictions:
    """One run's predictions of one split: sorted ids and, per task, values in that id order.

    Classification tasks hold class probabilities [N, classes]; regression tasks hold [N, k].
    """

    ids: list[str]
    preds: dict[str, np.ndarray]

    def reindexed(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        pos = {clip: i for i, clip in enumerate(self.ids)}
        rows = np.array([pos[clip] for clip in ids], dtype=np.int64)
        return {name: values[rows] for name, values in self.preds.items()}


@dataclass
class Run:
    folder: RunFolder
    val: SplitPredictions
    test: SplitPredictions | None
    scores: dict[str, float] = field(default_factory=dict)  # re-scored on the cache's Val labels
    tasks: TaskSet | None = None                            # what the run predicts (from its cache's attributes)

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def name(self) -> str:
        return self.path.name


def read_split_predictions(folder: Path, tasks: TaskSet) -> SplitPredictions | None:
    """Read a run's `predictions/<split>/` folder; None when it has no prediction files.

    Class probabilities come from the probabilities file; a run that only wrote the class file gets one-hot
    probabilities, so averaging them is a majority vote (ties to the lowest class index).
    """
    if not folder.is_dir():
        return None
    found = read_predictions(folder, tasks)
    if not found:
        return None
    ids_of = {name: ids for name, (ids, _) in found.items()}
    preds = {name: values for name, (_, values) in found.items()}
    names = [n for n in tasks.names if n in preds]
    ref = sorted(ids_of[names[0]])
    for name in names:
        ids = ids_of[name]
        if sorted(ids) != ref:
            missing = sorted(set(ref) - set(ids)) or sorted(set(ids) - set(ref))
            raise EnsembleError(f"{folder}: {tasks[name].title} predictions and {tasks[names[0]].title} "
                                f"predictions differ in File_ID {bracket_id(missing[0])}")
        order = np.argsort(np.array(ids, dtype=object), kind="stable")
        preds[name] = np.asarray(preds[name], dtype=np.float64)[order]
    return SplitPredictions(ref, {n: preds[n] for n in names})


def load_run(path: Path) -> Run:
    folder = read_run(path)
    tasks = tasks_of(folder.cache_attrs, str(path / CONFIG_FILE))
    val = read_split_predictions(predictions_dir(path, "Val"), tasks)
    if val is None:
        raise EnsembleError(f"{path}: no Val predictions in {predictions_dir(path, 'Val')}")
    missing = [tasks[n].title for n in tasks.names if n not in val.preds]
    if missing:
        raise EnsembleError(f"{path}: Val predictions lack {', '.join(missing)}")
    return Run(folder, val, read_split_predictions(predictions_dir(path, "Test"), tasks), tasks=tasks)


# ------------------------------------------------------------------------------------------- cache identity

def check_same_cache(runs: Sequence[Run]) -> None:
    """Refuse runs trained on different caches: different cache attributes (`check_compatible` of what each
    run recorded) or Val id sets."""
    first = runs[0]
    for run in runs[1:]:
        try:
            check_compatible(run.folder.cache_attrs, first.folder.cache_attrs, source=run.path)
        except IncompatibleCache as err:
            raise EnsembleError(f"runs {first.path} and {run.path} come from different caches "
                                f"({err.detail})") from None
        if set(run.val.ids) != set(first.val.ids):
            only = sorted(set(first.val.ids) ^ set(run.val.ids))[0]
            raise EnsembleError(f"runs {first.path} and {run.path} come from different caches "
                                f"(Val File_ID {bracket_id(only)} is in one and not the other)")


def check_run_matches_cache(run: Run, attrs: Mapping[str, Any], cache_path: str | os.PathLike) -> None:
    """Refuse a label cache (e.g. from --cache) that is not the one the runs were trained on."""
    try:
        check_compatible(attrs, run.folder.cache_attrs, source=cache_path)
    except IncompatibleCache as err:
        raise EnsembleError(f"run {run.path} was trained on a different cache than {cache_path} "
                            f"({err.detail})") from None


@dataclass
class CacheLabels:
    """What the ensemble needs from a cache: Val ids and labels, and the Test ids."""

    val_ids: list[str]
    val_labels: dict[str, np.ndarray]
    test_ids: list[str]
    tasks: TaskSet
    attrs: dict[str, Any] = field(default_factory=dict)


def read_cache_labels(path: str | os.PathLike, cv_round: Mapping[str, Any] | None = None) -> CacheLabels:
    """Label-only read of a feature cache (`load_cache` with no layers): Val ids and labels, Test ids; with
    `cv_round` (what runs of a cross-validation round record), the splits as that round sees them."""
    from cache.reader import load_cache  # noqa: PLC0415 - keeps `avb --help` light

    if not Path(path).is_file():
        raise EnsembleError(f"{path}: no such cache file (pass --cache to point at it)")
    if cv_round is not None:   # the folds are made over the whole cache
        data = apply_round(load_cache(path, layers=[]), cv_round)
    else:
        data = load_cache(path, layers=[], splits=["Val", "Test"])
    tasks = tasks_of(data.attrs, str(path))
    missing = [name for name in tasks.names if name not in data.labels]
    if missing:
        raise EnsembleError(f"{path}: the cache has no labels for {', '.join(missing)}")
    val_rows = data.indices("Val")
    if val_rows.size == 0:
        raise EnsembleError(f"{path}: the cache has no Val rows to score the ensemble on")
    order = val_rows[np.argsort(data.ids[val_rows], kind="stable")]
    return CacheLabels(
        val_ids=[str(i) for i in data.ids[order]],
        val_labels={name: np.asarray(data.labels[name], dtype=np.float64)[order] for name in tasks.names},
        test_ids=sorted(str(i) for i in data.ids[data.indices("Test")]),
        tasks=tasks,
        attrs=data.attrs,
    )


def _align(run: Run, split: str, preds: SplitPredictions, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The run's predictions in the order of `ids`; refuses when the id sets differ (naming one id)."""
    have, want = set(preds.ids), set(ids)
    missing = sorted(want - have)
    if missing:
        raise EnsembleError(f"{run.path}: {split} predictions lack File_ID {bracket_id(missing[0])} "
                            f"of the cache's {split} split ({len(missing)} missing)")
    extra = sorted(have - want)
    if extra:
        raise EnsembleError(f"{run.path}: {split} predictions have File_ID {bracket_id(extra[0])}, which is not "
                            f"in the cache's {split} split ({len(extra)} such ids)")
    return preds.reindexed(ids)


# ------------------------------------------------------------------------------------------------ strategies

Members = dict[str, list[tuple[int, float]]]  # task -> [(run index, weight)], weights sum to 1


def blend(preds: Sequence[Mapping[str, np.ndarray]], members: Members) -> dict[str, np.ndarray]:
    """Weighted average of the members' predictions per task (TYPE: of class probabilities)."""
    out: dict[str, np.ndarray] = {}
    for name, chosen in members.items():
        out[name] = sum(weight * preds[i][name] for i, weight in chosen)
    return out


def _headline(tasks: TaskSet, name: str, labels: Mapping[str, np.ndarray], values: np.ndarray) -> float:
    return score_all(tasks, labels, {name: values})[tasks[name].headline_key]


def select_combined(tasks: TaskSet, scores: Sequence[Mapping[str, float]]) -> Members:
    """Per task the run with the best Val headline score (ties: the earlier run)."""
    members: Members = {}
    for task in tasks:
        best = max(range(len(scores)), key=lambda i: (scores[i][task.headline_key], -i))
        members[task.name] = [(best, 1.0)]
    return members


def select_mean(tasks: TaskSet, scores: Sequence[Mapping[str, float]], top_k: int) -> Members:
    """The top-k runs by overall Val mean, equal weights, the same set for every task."""
    if top_k < 1:
        raise EnsembleError(f"--top-k must be at least 1, got {top_k}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i][SELECTION_KEY], i))[:top_k]
    return {name: [(i, 1.0 / len(ranked)) for i in ranked] for name in tasks.names}


def select_greedy(tasks: TaskSet, preds: Sequence[Mapping[str, np.ndarray]], labels: Mapping[str, np.ndarray],
                  rounds: int) -> Members:
    """Caruana forward selection with replacement, per task, on Val; stops when nothing improves."""
    if rounds < 1:
        raise EnsembleError(f"--rounds must be at least 1, got {rounds}")
    members: Members = {}
    for name in tasks.names:
        counts = np.zeros(len(preds), dtype=np.int64)
        total = np.zeros_like(preds[0][name])
        best_score = -np.inf
        for _ in range(rounds):
            n = counts.sum() + 1
            trial = [_headline(tasks, name, labels, (total + p[name]) / n) for p in preds]
            pick = int(np.argmax(trial))  # first maximum: ties go to the earlier run
            if trial[pick] <= best_score:
                break
            best_score = trial[pick]
            counts[pick] += 1
            total = total + preds[pick][name]
        members[name] = [(int(i), counts[i] / counts.sum()) for i in np.flatnonzero(counts)]
    return members


# ----------------------------------------------------------------------------------------------- the driver

@dataclass
class EnsembleResult:
    runs: list[Run]
    members: Members
    metrics: dict[str, float]
    warnings: list[str]
    files: list[Path]


def _short_metrics(tasks: TaskSet, scores: Mapping[str, float]) -> dict[str, float]:
    return {key: float(scores[key]) for key in (*tasks.metric_keys, SELECTION_KEY) if key in scores}


def build_ensemble(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                   config: EnsembleConfig | None = None) -> EnsembleResult:
    """Select members on Val, write Val predictions, metrics, members and the Test submission files."""
    config = config or EnsembleConfig()
    if config.strategy not in STRATEGIES:
        raise EnsembleError(f"unknown strategy {config.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    paths, warnings = find_runs(run_dirs)
    if not paths:
        raise EnsembleError("no complete runs to ensemble" + (f" ({warnings[0]})" if warnings else ""))
    runs = [load_run(p) for p in paths]
    rounds = {json.dumps(run.folder.config.get(CV_ROUND), sort_keys=True) for run in runs}
    if len(rounds) > 1:
        raise EnsembleError(f"the runs come from different cross-validation rounds ({', '.join(sorted(rounds))}); "
                            "ensemble the runs of one round")
    check_same_cache(runs)

    cache_path = config.cache or runs[0].folder.cache
    if not cache_path:
        raise EnsembleError(f"{runs[0].path / CONFIG_FILE}: no \"cache\" path recorded; pass --cache")
    labels = read_cache_labels(cache_path, runs[0].folder.config.get(CV_ROUND))
    check_run_matches_cache(runs[0], labels.attrs, cache_path)
    tasks = labels.tasks
    for run in runs:
        if run.tasks != tasks:
            raise EnsembleError(f"run {run.path} predicts {', '.join(run.tasks.names)} but {cache_path} holds "
                                f"{', '.join(tasks.names)}")

    val_preds = [_align(run, "Val", run.val, labels.val_ids) for run in runs]
    for run, preds in zip(runs, val_preds):
        run.scores = score_all(tasks, labels.val_labels, preds)
        recorded = run.folder.metrics.get("mean")
        if isinstance(recorded, (int, float)) and abs(recorded - run.scores["mean"]) > 1e-3:
            warnings.append(f"{run.path}: {METRICS_FILE} says mean {recorded:.4f} but its Val predictions score "
                            f"{run.scores['mean']:.4f} (predictions not from the best epoch?)")

    if config.strategy == "combined":
        members = select_combined(tasks, [r.scores for r in runs])
    elif config.strategy == "mean":
        members = select_mean(tasks, [r.scores for r in runs], config.top_k)
    else:
        members = select_greedy(tasks, val_preds, labels.val_labels, config.rounds)

    out = Path(out)
    (out / METRICS_FILE).unlink(missing_ok=True)  # written last: never leave an old one beside new files
    files: list[Path] = []
    val = blend(val_preds, members)
    files += _write_predictions(predictions_dir(out, "Val"), tasks, labels.val_ids, val, config)
    metrics = _rescore_written(predictions_dir(out, "Val"), labels, config)

    test_ids = labels.test_ids or (runs[0].test.ids if runs[0].test else [])
    if test_ids:
        test_preds = []
        for run in runs:
            if run.test is None:
                raise EnsembleError(f"{run.path}: no Test predictions in {predictions_dir(run.path, 'Test')}")
            test_preds.append(_align(run, "Test", run.test, test_ids))
        test = blend(test_preds, members)
        files += _write_test(out, tasks, test_ids, test, config)
    else:
        warnings.append(f"{cache_path}: no Test rows in the cache or the runs; no submission files written")

    files.append(write_members(out, _members_record(runs, members, config)))
    write_json_atomic(out / METRICS_FILE, metrics)
    files.append(out / METRICS_FILE)
    return EnsembleResult(runs, members, metrics, warnings, files)


def _write_predictions(folder: Path, tasks: TaskSet, ids: Sequence[str], preds: Mapping[str, np.ndarray],
                       config: EnsembleConfig) -> list[Path]:
    return write_predictions(folder, tasks, ids, preds, team=config.team, number=config.submission)


def _write_test(out: Path, tasks: TaskSet, ids: Sequence[str], preds: Mapping[str, np.ndarray],
                config: EnsembleConfig) -> list[Path]:
    """A-VB: the official submission files at the top of the folder, TYPE's probabilities under
    predictions/Test; any other corpus: the Test predictions under predictions/Test."""
    folder = predictions_dir(out, "Test")
    return write_predictions(folder if not tasks.is_avb else out, tasks, ids, preds, team=config.team,
                             number=config.submission, probs_folder=folder)


def _rescore_written(folder: Path, labels: CacheLabels, config: EnsembleConfig) -> dict[str, Any]:
    """Score the Val files as written, so metrics.json equals what `avb score` reports on them; with
    `config.ci`, each score gets its bootstrap interval `<score>_ci` (what `avb score --ci` reports)."""
    tasks = labels.tasks
    written = read_predictions(folder, tasks)
    preds = {}
    for name, (ids, values) in written.items():
        preds[name] = SplitPredictions(ids, {name: values}).reindexed(labels.val_ids)[name]
    metrics = _short_metrics(tasks, score_all(tasks, labels.val_labels, preds))
    if not config.ci:
        return metrics
    boot = BootstrapConfig(level=config.ci, n_boot=config.n_boot)
    return with_intervals(metrics, score_intervals(tasks, labels.val_labels, preds, boot))


def _members_record(runs: Sequence[Run], members: Members, config: EnsembleConfig) -> dict[str, Any]:
    return members_record(
        strategy=config.strategy,
        top_k=config.top_k if config.strategy == "mean" else None,
        rounds=config.rounds if config.strategy == "greedy" else None,
        tasks={name: [(runs[i].path, w) for i, w in members[name]] for name in members},
        runs=[(r.path, _short_metrics(r.tasks, r.scores)) for r in runs],
    )


def format_table(result: EnsembleResult) -> str:
    """Each member's Val headline score per task, then the ensemble's."""
    keys = list(result.runs[0].tasks.headline_keys.values()) + [SELECTION_KEY]
    used = {i for chosen in result.members.values() for i, _ in chosen}
    width = max([len("ensemble")] + [len(r.name) for r in result.runs]) + 2
    lines = [f"{'run':<{width}}" + "".join(f"{k:>13}" for k in keys)]
    for i, run in enumerate(result.runs):
        if i in used:
            lines.append(f"{run.name:<{width}}" + "".join(f"{run.scores[k]:>13.4f}" for k in keys))
    lines.append(f"{'ensemble':<{width}}" + "".join(f"{result.metrics[k]:>13.4f}" for k in keys))
    if all(f"{k}_ci" in result.metrics for k in keys):
        lines.append(f"{'  CI low':<{width}}" + "".join(f"{result.metrics[k + '_ci'][0]:>13.4f}" for k in keys))
        lines.append(f"{'  CI high':<{width}}" + "".join(f"{result.metrics[k + '_ci'][1]:>13.4f}" for k in keys))
    return "\n".join(lines)


@click.command("ensemble")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: metrics.json, members.json, predictions/ and the submission CSVs.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=EnsembleConfig.strategy, show_default=True,
              help="combined: best run per task; mean: average of the top-k; greedy: forward selection per task.")
@click.option("--top-k", default=EnsembleConfig.top_k, show_default=True, help="Runs averaged by --strategy mean.")
@click.option("--rounds", default=EnsembleConfig.rounds, show_default=True,
              help="Maximum selection steps per task for --strategy greedy.")
@click.option("--team", default=EnsembleConfig.team, show_default=True, help="Team name in the file names.")
@click.option("--submission", default=EnsembleConfig.submission, show_default=True,
              help="Submission number in the file names.")
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache to read Val labels and Test ids from (default: the one in the runs' config.json).")
@click.option("--ci", default=DEFAULT_LEVEL, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Level of the percentile-bootstrap interval of every Val score in metrics.json "
                   "(<score>_ci = [low, high]); 0: no intervals.")
@click.option("--n-boot", default=DEFAULT_N_BOOT, show_default=True, type=click.IntRange(min=1),
              help="Bootstrap resamples of the Val clips (with --ci).")
def ensemble_command(run_dirs: tuple[Path, ...], out: Path, strategy: str, top_k: int, rounds: int, team: str,
                     submission: int, cache: Path | None, ci: float, n_boot: int) -> None:
    """Ensemble RUN_DIRS (run dirs, or ablation dirs meaning every complete run inside) on Val."""
    config = EnsembleConfig(strategy, top_k, rounds, team, submission, str(cache) if cache else None, ci, n_boot)
    with command_errors():
        result = build_ensemble(run_dirs, out, config)
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(format_table(result))
    used = len({i for chosen in result.members.values() for i, _ in chosen})
    click.echo(f"{strategy} ensemble of {used} of {len(result.runs)} runs; wrote {len(result.files)} files to {out}")
