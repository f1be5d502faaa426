"""Experiment tracking for both stages: TensorBoard, Weights & Biases and MLflow, offline by default.

Stage 1 (`avb finetune`) hands the chosen tracker names to accelerate (`Accelerator(log_with=...)`,
`init_trackers`, `accelerator.log`), which is what accelerate users expect; `accelerate_init_kwargs` holds the
per-tracker settings that keep it offline. Stage 2 has no Accelerator in its loop, so `HeadsTracker` talks to
the libraries directly: `train_runs` calls it once per run and epoch, and every run gets its own log (a
TensorBoard folder `<tracking dir>/<run name>`, a W&B run, an MLflow run), so a grid's runs sit side by side in
one dashboard. Going to the libraries directly also keeps every run of a joint group logging (accelerate's
trackers log on the main process only, which would silence the runs of other ranks in a distributed grid).

Offline unless the user says otherwise, and never a network call by default: W&B runs with
`WANDB_MODE=offline` unless that variable is set (then `wandb sync` uploads later), MLflow writes a local SQLite
store `<tracking dir>/mlflow.db` unless `MLFLOW_TRACKING_URI` names another store or a server (MLflow 3 refuses
new file stores such as `./mlruns`); TensorBoard is files only.

Metric names, shared by both stages: `train/loss` (weighted total), `train/loss_<task>`, `loss_weight/<task>`,
`lr/head` (and `lr/backbone` in stage 1), `val/<metric>` for every Val score and `val/mean`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cache.command_kit.errors import AvbError

TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")
REPORT_TO_CHOICES: tuple[str, ...] = ("none", *TRACKERS, "all")
INSTALL_HINTS: dict[str, str] = {
    "tensorboard": "pip install 'avb-heads[track]'", "wandb": "pip install wandb", "mlflow": "pip install mlflow",
}
TRACKING_DIR = "tracking"            # default log folder inside a run, grid or fine-tuning output folder
PROJECT = "avb-heads"                # W&B project / MLflow experiment name of stage-2 runs
EVENTS_PREFIX = "events.out.tfevents."
MLFLOW_DB = "mlflow.db"              # the default MLflow store inside the tracking dir


class TrackingError(AvbError):
    """A tracker that was asked for but cannot be used (unknown name, package not installed)."""


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_report_to(value: str) -> list[str]:
    """`--report-to` -> the tracker names to use: 'none' -> [], 'all' -> every installed one, else that one.

    Asking for a tracker whose package is missing is an error naming the install command (silently logging to
    nothing would be found out only after a long run).
    """
    value = (value or "none").strip().lower()
    if value == "none":
        return []
    if value == "all":
        found = [name for name in TRACKERS if installed(name)]
        if not found:
            raise TrackingError(f"--report-to all: none of {', '.join(TRACKERS)} is installed "
                                f"({INSTALL_HINTS['tensorboard']})")
        return found
    if value not in TRACKERS:
        raise TrackingError(f"unknown tracker {value!r}; expected one of {', '.join(REPORT_TO_CHOICES)}")
    if not installed(value):
        raise TrackingError(f"--report-to {value} needs the {value} package: {INSTALL_HINTS[value]}")
    return [value]


def local_mlflow_uri(log_dir: str | os.PathLike) -> str:
    """MLFLOW_TRACKING_URI when set (the user chose a store or a server), else a SQLite store in the tracking
    dir (created here): MLflow 3 keeps its file store (`./mlruns`) in maintenance mode and refuses new ones."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(log_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / MLFLOW_DB}"


@contextlib.contextmanager
def _store_setup_lock(log_dir: Path):
    """One process at a time creates the SQLite store's tables and the experiment: every rank of a distributed
    grid logs its own runs to the same store, and two first opens at once would race on the schema."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f".{MLFLOW_DB}.setup-lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or "offline"


def accelerate_init_kwargs(names: Sequence[str], log_dir: str | os.PathLike, run_name: str,
                           purge_step: int | None = None) -> dict[str, dict[str, Any]]:
    """`init_kwargs` for `Accelerator.init_trackers`: offline W&B in the tracking dir, a local MLflow store,
    and for TensorBoard after a resume `purge_step`, so the steps redone since the checkpoint replace the
    ones logged before the interruption instead of appearing twice."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and purge_step is not None:
        kwargs["tensorboard"] = {"purge_step": int(purge_step)}
    if "wandb" in names:
        kwargs["wandb"] = {"mode": wandb_mode(), "dir": str(log_dir), "name": run_name}
    if "mlflow" in names:
        import mlflow  # noqa: PLC0415 - only when asked for

        users = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(local_mlflow_uri(log_dir))
        # MLflow also writes the URI into MLFLOW_TRACKING_URI, which would pass it off as the user's choice to the
        # next run in this process; its own module setting is what its fluent API reads first.
        if users is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = users
        kwargs["mlflow"] = {"run_name": run_name, "logging_dir": str(log_dir)}
    return kwargs


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}: what tracker hyper-parameter tables accept (lists become strings)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        else:
            out[name] = str(value)
    return out


def epoch_values(entry: Mapping[str, Any]) -> dict[str, float]:
    """A history entry (`heads.runs.history_entry`) -> tracker metrics: `lr/<group>` for each learning rate."""
    values = {"train/loss": float(entry["loss"])}
    values.update({f"lr/{group}": float(lr) for group, lr in entry["lr"].items()})
    for task, loss in entry["task_losses"].items():
        values[f"train/loss_{task}"] = float(loss)
        values[f"loss_weight/{task}"] = float(entry["weights"][task])
    values.update({f"val/{key}": float(v) for key, v in entry["val"].items()})
    return values


# ------------------------------------------------------------------------------------------- stage 2

class _TensorBoardRun:
    def __init__(self, log_dir: Path, run: str, config: Mapping[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - needs the tensorboard package

        folder = log_dir / run
        if folder.is_dir():  # a run trained again (e.g. a grid resumed after a kill) replaces its old curves
            for old in folder.glob(f"{EVENTS_PREFIX}*"):
                old.unlink()
        self.writer = SummaryWriter(str(folder))
        if config:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in flat_config(config).items()))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandbRun:
    def __init__(self, log_dir: Path, run: str, config: Mapping[str, Any] | None) -> None:
        import wandb  # noqa: PLC0415

        log_dir.mkdir(parents=True, exist_ok=True)
        # a new W&B run per head run; "create_new" lets the runs of a joint group stay open side by side
        self.run = wandb.init(project=PROJECT, name=run, dir=str(log_dir), mode=wandb_mode(),
                              config=dict(flat_config(config or {})), reinit="create_new")

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class _MlflowRun:
    def __init__(self, log_dir: Path, run: str, config: Mapping[str, Any] | None) -> None:
        from mlflow.tracking import MlflowClient  # noqa: PLC0415

        with _store_setup_lock(log_dir):
            self.client = MlflowClient(tracking_uri=local_mlflow_uri(log_dir))
            experiment = self.client.get_experiment_by_name(PROJECT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(experiment_id, run_name=run).info.run_id
        for key, value in flat_config(config or {}).items():
            self.client.log_param(self.run_id, key, value)

    def log(self, values: Mapping[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, value, timestamp=stamp, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": _TensorBoardRun, "wandb": _WandbRun, "mlflow": _MlflowRun}


class HeadsTracker:
    """The `tracker` of `train_runs` / `run_grid`: per run and epoch, the epoch's losses, loss weights, LR and
    every Val score, to each chosen tracker. A run's log is opened at its first epoch; `close()` ends them all.

    `config_of(run name)` gives the config stored with each run where the tracker has a place for it (the CLI
    reads the run folder's config.json, which `train_runs` writes before the first epoch).
    """

    def __init__(self, names: Sequence[str], log_dir: str | os.PathLike,
                 config_of: Callable[[str], Mapping[str, Any] | None] | None = None) -> None:
        unknown = [n for n in names if n not in _BACKENDS]
        if unknown:
            raise TrackingError(f"unknown tracker {unknown[0]!r}; expected one of {', '.join(TRACKERS)}")
        self.names = list(names)
        self.log_dir = Path(log_dir)
        self.config_of = config_of
        self._open: dict[str, list[Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, run: str, epoch: int, entry: Mapping[str, Any]) -> None:
        if run not in self._open:
            config = self.config_of(run) if self.config_of is not None else None
            self._open[run] = [_BACKENDS[n](self.log_dir, run, config) for n in self.names]
        values = epoch_values(entry)
        for backend in self._open[run]:
            backend.log(values, epoch)

    def close(self) -> None:
        for backends in self._open.values():
            for backend in backends:
                backend.close()
        self._open.clear()

    def __enter__(self) -> HeadsTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
