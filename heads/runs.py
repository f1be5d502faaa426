"""A run directory: the files one trained head leaves behind, and how to find complete ones.

`heads.train` writes it; `avb ensemble`, `avb report` and `avb predict` read it:

    <run>/config.json             the resolved TrainConfig + the cache it was trained on ("cache", "cache_attrs")
    <run>/head.safetensors        the best epoch's weights of this run
    <run>/predictions/{val,test}/ official submission CSVs + type_probs.csv of the best epoch
    <run>/metrics.json            best-epoch scores + per-epoch history; written LAST, so it marks completion

An ablation directory holds many run directories (plus results.csv/md/json and its own config.json).

A fine-tuning output (`avb finetune`) looks similar but is another thing: the backbone itself and the head
trained end to end with it, on raw audio rather than cached features.

    <ft>/config.json              the FinetuneConfig + "kind": "finetune", "finetune_format", "head", "layer_dims"
    <ft>/backbone/                the best epoch's backbone (save_pretrained)
    <ft>/head.safetensors         the best epoch's head (one run, R = 1)
    <ft>/metrics.json             {"best": ..., "history": [...]} (rewritten after every validation)

Both write the same history: `metrics.json["history"]` is a list of `history_entry` records, one per
validation, so one plotting and tracking path serves both stages; `read_history` is the only reader.

Its config.json carries the marker `"kind": "finetune"`, so readers can tell it from a head run (outputs of
versions before the marker are recognised by their `lr_backbone` and `layer_dims` fields); `avb predict`
applies its head to its own backbone, and run readers refuse it with a message saying what it is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from heads.tasks import TASK_NAMES

RUN_FORMAT = 2            # bump when the files of a run folder change meaning; readers refuse other values
                          # (2: the heads stack their four tasks, so head.safetensors holds other tensors)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HEAD_FILE = "head.safetensors"
PREDICTIONS_DIR = "predictions"
FINETUNE_KIND = "finetune"   # config.json "kind" of a fine-tuning output
FINETUNE_FORMAT = 1          # bump when the files of a fine-tuning output change meaning
BACKBONE_DIR = "backbone"


HISTORY_KEYS = ("epoch", "step", "partial", "loss", "task_losses", "weights", "lr", "val")


class RunDirError(ValueError):
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


def is_finetune_config(config: dict[str, Any]) -> bool:
    """The config.json of a fine-tuning output: the marker, or (before the marker existed) its telltale fields."""
    if config.get("kind") == FINETUNE_KIND:
        return True
    return config.get("run_format") is None and "lr_backbone" in config and "layer_dims" in config


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
            "task_losses": {t: float(task_losses[t]) for t in TASK_NAMES},
            "weights": {t: float(weights[t]) for t in TASK_NAMES},
            "lr": {str(k): float(v) for k, v in lr.items()},
            "val": {str(k): float(v) for k, v in val.items()}}


def read_history(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The history of a metrics.json in the `history_entry` schema.

    Files written before the schema was shared are read too: fine-tuning's `train_loss`, `loss_weights`,
    `lr_backbone`/`lr_head`, and the heads' single float `lr` without `step`.
    """
    history = []
    for entry in metrics.get("history") or []:
        if not isinstance(entry, Mapping):
            continue
        entry = dict(entry)
        if "train_loss" in entry:
            entry["loss"] = entry.pop("train_loss")
        if "loss_weights" in entry:
            entry["weights"] = entry.pop("loss_weights")
        if "lr_head" in entry or "lr_backbone" in entry:
            entry["lr"] = {"backbone": entry.pop("lr_backbone", None), "head": entry.pop("lr_head", None)}
        if isinstance(entry.get("lr"), (int, float)):
            entry["lr"] = {"head": entry["lr"]}
        entry.setdefault("partial", False)
        history.append(entry)
    return history
