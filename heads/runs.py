"""A run directory: the files one trained head leaves behind, and how to find complete ones.

`heads.training.joint` writes it; `avb ensemble`, `avb report` and `avb predict` read it:

    <run>/config.json             the resolved TrainConfig + the cache it was trained on ("cache", "cache_attrs")
    <run>/head.safetensors        the best epoch's weights of this run
    <run>/predictions/{val,test}/ official submission CSVs + type_probs.csv of the best epoch
    <run>/metrics.json            best-epoch scores + per-epoch history; written LAST, so it marks completion

An ablation directory holds many run directories (plus results.csv/md/json and its own config.json).

An ensemble directory (`avb ensemble`) holds the blended predictions of some runs and says which:

    <ens>/members.json            {"strategy", "top_k", "rounds", "tasks": {task: [{"run", "weight"}]},
                                   "runs": [{"run", "val"}]}: per task the member runs and their weights, and every
                                   candidate run with its Val scores (`members_record` is the schema)
    <ens>/predictions/{val,test}/ the ensemble's Val predictions and type_probs.csv; the Test submission beside them
    <ens>/metrics.json            the ensemble's Val scores; written LAST

`output_kind` tells these folders apart; `read_run` and `read_ensemble` give their typed contents.

A fine-tuning output (`avb finetune`) looks similar but is another thing: the backbone itself and the head
trained end to end with it, on raw audio rather than cached features.

    <ft>/config.json              the FinetuneConfig + "kind": "finetune", "finetune_format", "head", "layer_dims"
    <ft>/backbone/                the best epoch's backbone (save_pretrained)
    <ft>/head.safetensors         the best epoch's head (one run, R = 1)
    <ft>/metrics.json             {"best": ..., "history": [...]} (rewritten after every validation)

Both write the same history: `metrics.json["history"]` is a list of `history_entry` records, one per
validation, so one plotting and tracking path serves both stages; `read_history` is the only reader.

Its config.json carries the marker `"kind": "finetune"`, so readers can tell it from a head run; `avb predict`
applies its head to its own backbone, and run readers refuse it with a message saying what it is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.command_kit.atomic import write_json_atomic
from cache.command_kit.errors import AvbError

RUN_FORMAT = 2            # bump when the files of a run folder change meaning; readers refuse other values
                          # (2: the heads stack their tasks, so head.safetensors holds other tensors)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
MEMBERS_FILE = "members.json"
HEAD_FILE = "head.safetensors"
PREDICTIONS_DIR = "predictions"
FINETUNE_KIND = "finetune"   # config.json "kind" of a fine-tuning output
FINETUNE_FORMAT = 1          # bump when the files of a fine-tuning output change meaning
BACKBONE_DIR = "backbone"
TRAINED_ON_FILE = "avb_trained_on.json"   # in a fine-tuned backbone folder: {"corpus", "ids"} it was trained on
CHECKPOINTS_DIR = "checkpoints"   # a fine-tuning output's save_state checkpoints
RESULTS_CSV, RESULTS_JSON, RESULTS_MD = "results.csv", "results.json", "results.md"   # an ablation grid's tables
PROBE_CSV, PROBE_JSON, PROBE_MD = "probe.csv", "probe.json", "probe.md"               # a probe folder's files
STUDY_FILE, TRIALS_CSV = "study.db", "trials.csv"   # a search folder's Optuna study (SQLite) and trial list
STUDY_NAME = "avb-heads-search"                    # the study's name inside study.db


# What `output_kind` calls each folder.
RUN, ENSEMBLE, FINETUNE, ABLATION = "run", "ensemble", "finetune", "ablation"

HISTORY_KEYS = ("epoch", "step", "partial", "loss", "task_losses", "weights", "lr", "val")


class RunDirError(AvbError):
    """A folder that is not what it should be, or an unreadable JSON file in it; names the path."""


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from `path`, with a one-line error naming the file for every way it can be wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return data


def predictions_dir(folder: str | os.PathLike, split: str) -> Path:
    """Where a run or ensemble keeps its predictions of one split: FOLDER/predictions/{val,test}."""
    return Path(folder) / PREDICTIONS_DIR / split.lower()


def is_finetune_config(config: dict[str, Any]) -> bool:
    """The config.json of a fine-tuning output: it carries the marker `"kind": "finetune"`."""
    return config.get("kind") == FINETUNE_KIND


def is_finetune_dir(path: str | os.PathLike) -> bool:
    """A folder written by `avb finetune`: config.json (marked), backbone/ and head.safetensors."""
    path = Path(path)
    if not ((path / CONFIG_FILE).is_file() and (path / BACKBONE_DIR).is_dir() and (path / HEAD_FILE).is_file()):
        return False
    try:
        return is_finetune_config(read_json_object(path / CONFIG_FILE))
    except RunDirError:
        return False


def read_finetune_config(ft_dir: str | os.PathLike) -> dict[str, Any]:
    """A fine-tuning output's config.json, refused when it was written by a newer fine-tuning format."""
    path = Path(ft_dir) / CONFIG_FILE
    config = read_json_object(path)
    if not is_finetune_config(config):
        raise RunDirError(f"{path}: not the config of a fine-tuning output (avb finetune)")
    found = config.get("finetune_format", FINETUNE_FORMAT)
    if found != FINETUNE_FORMAT:
        raise RunDirError(f"{path}: written with finetune_format {found!r}; this version reads finetune_format "
                          f"{FINETUNE_FORMAT}")
    return config


def not_a_head_run(ft_dir: str | os.PathLike) -> RunDirError:
    """The error for a fine-tuning output given where head runs are expected: what it is and how to use it."""
    ft_dir = Path(ft_dir)
    return RunDirError(f"{ft_dir}: a fine-tuning output (avb finetune), not a head run: predict with it directly "
                       f"(avb predict --model {ft_dir / BACKBONE_DIR} --heads {ft_dir}), or dump its backbone and "
                       "train heads on the cache")


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's config.json, refused with a clear error when it was written by another run-folder format."""
    path = Path(run_dir) / CONFIG_FILE
    config = read_json_object(path)
    if is_finetune_config(config):
        raise not_a_head_run(run_dir)
    found = config.get("run_format")
    if found != RUN_FORMAT:
        what = "no run_format (an older version)" if found is None else f"run_format {found!r}"
        raise RunDirError(f"{path}: written with {what}; this version reads run_format {RUN_FORMAT}: retrain it "
                          "(avb heads train / avb heads ablate)")
    return config


def is_run_dir(path: Path) -> bool:
    """A run dir holds its config plus weights or predictions (an ablation dir holds only a config; a
    fine-tuning output is not a head run)."""
    return (path / CONFIG_FILE).is_file() and (
        (path / HEAD_FILE).is_file() or (path / PREDICTIONS_DIR).is_dir()) and not is_finetune_dir(path)


def is_complete(path: Path) -> bool:
    return (path / METRICS_FILE).is_file()


def runs_inside(path: Path) -> list[Path]:
    """The run dirs anywhere below `path`, sorted."""
    return sorted({p.parent for p in path.rglob(CONFIG_FILE) if is_run_dir(p.parent)})


def find_runs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Expand run and ablation dirs into complete run dirs; returns (runs, warnings about skipped ones).

    A run without `metrics.json` is incomplete (it is written last) and is skipped with a warning; a run
    named twice (directly and through its ablation) is taken once.
    """
    runs: list[Path] = []
    seen: set[Path] = set()
    warnings: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise RunDirError(f"{path}: not a directory")
        if is_finetune_dir(path):
            raise not_a_head_run(path)
        candidates = [path] if is_run_dir(path) else runs_inside(path)
        if not candidates:
            raise RunDirError(f"{path}: neither a run dir nor an ablation dir with run dirs inside")
        for run in candidates:
            if not is_complete(run):
                warnings.append(f"skipping incomplete run {run} (no {METRICS_FILE})")
            elif run.resolve() not in seen:
                seen.add(run.resolve())
                runs.append(run)
    return runs, warnings


def output_kind(path: str | os.PathLike) -> str | None:
    """FINETUNE, ENSEMBLE (members.json), RUN (`is_run_dir`), ABLATION (run dirs inside) or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if is_finetune_dir(path):
        return FINETUNE
    if (path / MEMBERS_FILE).is_file():
        return ENSEMBLE
    if is_run_dir(path):
        return RUN
    return ABLATION if runs_inside(path) else None


@dataclass
class RunFolder:
    """A complete run folder: its config.json and metrics.json."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def cache(self) -> str | None:
        """The cache path the run was trained on, as recorded."""
        cache = self.config.get("cache")
        return str(cache) if cache else None

    @property
    def cache_attrs(self) -> dict[str, Any]:
        """The cache attributes the run was trained on (`cache.reader.compat_attrs`), {} when none recorded."""
        attrs = self.config.get("cache_attrs")
        return dict(attrs) if isinstance(attrs, Mapping) else {}

    @property
    def history(self) -> list[dict[str, Any]]:
        return read_history(self.metrics)


def read_run(run_dir: str | os.PathLike) -> RunFolder:
    """A complete run: config.json (checked by `read_run_config`) and metrics.json."""
    run_dir = Path(run_dir)
    return RunFolder(run_dir, read_run_config(run_dir), read_json_object(run_dir / METRICS_FILE))


@dataclass
class EnsembleFolder:
    """An ensemble folder: per task its member runs and weights (paths as written in members.json, see
    `member_dir`), every candidate run with its Val scores, and the ensemble's metrics ({} before they exist)."""

    path: Path
    strategy: str | None
    members: dict[str, list[tuple[Path, float]]]
    runs: list[tuple[Path, dict[str, Any]]]
    metrics: dict[str, Any]

    def member_dir(self, run: Path) -> Path:
        """A member path: absolute, or relative to the working dir the ensemble was built from (tried first) or
        to the ensemble dir / its parent (an ensemble moved together with its runs)."""
        candidates = [run] if run.is_absolute() else [run, self.path / run, self.path.parent / run]
        for candidate in candidates:
            if (candidate / CONFIG_FILE).is_file():
                return candidate
        raise RunDirError(f"{self.path / MEMBERS_FILE}: member run {run} not found "
                          f"(looked in {', '.join(str(c) for c in candidates)})")


def members_record(*, strategy: str, top_k: int | None, rounds: int | None,
                   tasks: Mapping[str, Sequence[tuple[str | os.PathLike, float]]],
                   runs: Sequence[tuple[str | os.PathLike, Mapping[str, float]]]) -> dict[str, Any]:
    """members.json: the strategy and its setting, per task the member runs and weights, every candidate's Val."""
    return {
        "strategy": strategy,
        "top_k": top_k,
        "rounds": rounds,
        "tasks": {name: [{"run": str(run), "weight": float(w)} for run, w in members]
                  for name, members in tasks.items()},
        "runs": [{"run": str(run), "val": dict(val)} for run, val in runs],
    }


def _task_members(path: Path, name: str, entries: Any) -> list[tuple[Path, float]]:
    chosen = []
    for entry in entries if isinstance(entries, list) else [None]:
        if not isinstance(entry, Mapping) or "run" not in entry or "weight" not in entry:
            raise RunDirError(f"{path}: task {name} has a member without run/weight")
        chosen.append((Path(str(entry["run"])), float(entry["weight"])))
    if not chosen or not sum(w for _, w in chosen) > 0:
        raise RunDirError(f"{path}: task {name} has no members with positive weight")
    return chosen


def read_ensemble(ens_dir: str | os.PathLike) -> EnsembleFolder:
    """An ensemble folder's members.json (checked: every task has members with positive total weight) and its
    metrics.json when present."""
    ens_dir = Path(ens_dir)
    path = ens_dir / MEMBERS_FILE
    data = read_json_object(path)
    tasks = data.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise RunDirError(f"{path}: 'tasks' must map each task to its members")
    members = {str(name): _task_members(path, name, entries) for name, entries in tasks.items()}
    runs = [(Path(str(r["run"])), dict(r["val"])) for r in data.get("runs") or []
            if isinstance(r, Mapping) and "run" in r and isinstance(r.get("val"), Mapping)]
    metrics = read_json_object(ens_dir / METRICS_FILE) if (ens_dir / METRICS_FILE).is_file() else {}
    strategy = data.get("strategy")
    return EnsembleFolder(ens_dir, str(strategy) if strategy is not None else None, members, runs, metrics)


def write_members(ens_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write a `members_record` as the ensemble folder's members.json (atomically)."""
    path = Path(ens_dir) / MEMBERS_FILE
    write_json_atomic(path, dict(record))
    return path


def history_entry(*, epoch: int, step: int, loss: float, task_losses: Mapping[str, float],
                  weights: Mapping[str, float], lr: Mapping[str, float], val: Mapping[str, float],
                  partial: bool = False) -> dict[str, Any]:
    """One validation's record, the same in both stages.

    `epoch` counts from 1, `step` is the optimiser steps taken so far, `partial` marks a validation inside an
    epoch (fine-tuning's --val-every); `loss` is the mean weighted training loss since the last record,
    `task_losses`/`weights` map each task to its mean loss and its loss weight, `lr` maps each parameter group
    ("head"; fine-tuning also "backbone") to its learning rate, `val` maps each Val metric to its score.
    """
    return {"epoch": int(epoch), "step": int(step), "partial": bool(partial), "loss": float(loss),
            "task_losses": {str(t): float(v) for t, v in task_losses.items()},
            "weights": {str(t): float(w) for t, w in weights.items()},
            "lr": {str(k): float(v) for k, v in lr.items()},
            "val": {str(k): float(v) for k, v in val.items()}}


def read_history(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The history of a metrics.json: its `history_entry` records (anything else in the list is skipped)."""
    return [dict(entry) for entry in metrics.get("history") or [] if isinstance(entry, Mapping)]
