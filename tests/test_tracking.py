"""Experiment tracking of stage 2: TensorBoard event files read back equal each run's metrics.json history, one
log folder per run; W&B and MLflow adapters (fakes standing in for the packages, which are not installed here)
stay offline; a tracker whose package is missing is refused before any work."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_signal_cache
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from extract.app.cli import main as avb
from heads.runs import RUN_FORMAT, history_entry
from heads.tasks import METRIC_KEYS, TASK_NAMES
from heads.training import tracking
from heads.training.tracking import (
    HeadsTracker,
    TrackingError,
    epoch_values,
    resolve_report_to,
)

COMMON = ["--epochs", "3", "--hidden", "16", "--no-progress"]


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("cache") / "signal.h5", sizes=(120, 60, 20))


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_log_equals_history(folder: Path, run_dir: Path) -> None:
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    logged = scalars(folder)
    epochs = [h["epoch"] for h in history]
    expected_tags = {"train/loss", "lr/head", *(f"train/loss_{t}" for t in TASK_NAMES),
                     *(f"loss_weight/{t}" for t in TASK_NAMES), *(f"val/{k}" for k in (*METRIC_KEYS, "mean"))}
    assert set(logged) == expected_tags
    for tag, values in logged.items():
        assert [s for s, _ in values] == epochs, tag
    for h in history:
        want = epoch_values(h)
        for tag, values in logged.items():
            assert dict(values)[h["epoch"]] == pytest.approx(want[tag], rel=1e-6, abs=1e-7), (tag, h["epoch"])


def test_heads_train_logs_every_epoch_to_tensorboard_in_the_run_folder(cache_file, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(avb, ["heads", "train", "--cache", str(cache_file), "--out", str(out), "--weighting",
                                   "rruw", "--report-to", "tensorboard", *COMMON])
    assert res.exit_code == 0, res.output
    folder = out / "tracking" / "vanilla-rruw-s0"
    assert_log_equals_history(folder, out)
    events = EventAccumulator(str(folder))
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "weighting = rruw" in text and f"run_format = {RUN_FORMAT}" in text   # its config.json rides along


def test_heads_ablate_logs_one_folder_per_run_and_a_retrained_run_replaces_its_curves(cache_file, tmp_path):
    out, logs = tmp_path / "grid", tmp_path / "tb"
    args = ["heads", "ablate", "--cache", str(cache_file), "--out", str(out), "--archs", "vanilla,chain",
            "--weightings", "uniform,dwa", "--report-to", "tensorboard", "--tracking-dir", str(logs), "--ci", "0",
            *COMMON]
    res = CliRunner().invoke(avb, args)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in logs.iterdir())
    assert names == sorted(f"{a}-{w}-s0" for a in ("vanilla", "chain") for w in ("uniform", "dwa"))
    for name in names:
        assert_log_equals_history(logs / name, out / name)
    # curves differ between runs: each folder has its own run's numbers
    assert scalars(logs / "chain-dwa-s0")["val/mean"] != scalars(logs / "vanilla-dwa-s0")["val/mean"]
    (out / "chain-uniform-s0" / "metrics.json").unlink()       # an interrupted run: the rerun trains it again
    stamp = {n: sorted(p.name for p in (logs / n).iterdir()) for n in names}
    res = CliRunner().invoke(avb, args)
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (logs / "chain-uniform-s0").iterdir())
    assert len(files) == 1 and files != stamp["chain-uniform-s0"]          # the old events file is gone
    assert_log_equals_history(logs / "chain-uniform-s0", out / "chain-uniform-s0")   # 3 epochs, not 6
    assert sorted(p.name for p in (logs / "vanilla-dwa-s0").iterdir()) == stamp["vanilla-dwa-s0"]  # not retrained


def test_report_to_resolution_and_missing_packages(monkeypatch):
    assert resolve_report_to("none") == [] and resolve_report_to("TensorBoard") == ["tensorboard"]
    with pytest.raises(TrackingError, match="unknown tracker 'comet'"):
        resolve_report_to("comet")
    monkeypatch.setattr(tracking, "installed", lambda name: name != "mlflow")
    with pytest.raises(TrackingError, match=r"^--report-to mlflow needs the mlflow package: pip install mlflow$"):
        resolve_report_to("mlflow")
    assert resolve_report_to("all") == ["tensorboard", "wandb"]
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    with pytest.raises(TrackingError, match=r"--report-to all: none of tensorboard, wandb, mlflow is installed"):
        resolve_report_to("all")


def test_a_tracker_that_is_not_installed_stops_the_commands_before_any_work(cache_file, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda name: name == "tensorboard")
    res = CliRunner().invoke(avb, ["heads", "train", "--cache", str(cache_file), "--out", str(tmp_path / "r"),
                                   "--report-to", "wandb", *COMMON])
    assert res.exit_code == 1
    assert res.output.strip() == "Error: --report-to wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(avb, ["finetune", "--corpus", str(tmp_path), "--out", str(tmp_path / "ft"),
                                   "--report-to", "mlflow", "--quiet"])
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1] == (
        "Error: --report-to mlflow needs the mlflow package: pip install mlflow")
    assert not (tmp_path / "ft").exists()


# ------------------------------------------------------------------------- W&B and MLflow, offline

class FakeWandbRun:
    def __init__(self, calls: list, kwargs: dict) -> None:
        self.calls, self.kwargs = calls, kwargs

    def log(self, values, step=None):
        self.calls.append(("log", self.kwargs["name"], step, dict(values)))

    def finish(self):
        self.calls.append(("finish", self.kwargs["name"]))


def fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_wandb_and_mlflow_runs_are_offline_one_per_head_run(tmp_path, monkeypatch):
    calls: list = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeWandbRun(calls, kwargs)

    class FakeClient:
        def __init__(self, tracking_uri):
            calls.append(("client", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            calls.append(("experiment", name))
            return "7"

        def create_run(self, experiment_id, run_name):
            calls.append(("run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id=f"id-{run_name}"))

        def log_param(self, run_id, key, value):
            calls.append(("param", run_id, key, value))

        def log_metric(self, run_id, key, value, timestamp, step):
            calls.append(("metric", run_id, key, value, step))

        def set_terminated(self, run_id):
            calls.append(("terminated", run_id))

    mlflow = fake_module("mlflow")
    mlflow.tracking = fake_module("mlflow.tracking", MlflowClient=FakeClient)
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", mlflow.tracking)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_report_to("all") == ["tensorboard", "wandb", "mlflow"]

    entry = history_entry(epoch=2, step=20, loss=1.5, lr={"head": 1e-3}, task_losses=dict.fromkeys(TASK_NAMES, 0.25),
                          weights=dict.fromkeys(TASK_NAMES, 1.0), val={"type_uar": 0.5, "mean": 0.4})
    config = {"arch": "chain", "head": {"hidden": 8}}
    with HeadsTracker(["wandb", "mlflow"], tmp_path / "logs", lambda run: config) as t:
        t("chain-dwa-s0", 2, entry)
        t("chain-dwa-s1", 2, entry)
    init_kwargs = calls[0][1]
    assert init_kwargs["mode"] == "offline" and init_kwargs["dir"] == str(tmp_path / "logs")
    assert (init_kwargs["project"], init_kwargs["name"]) == ("avb-heads", "chain-dwa-s0")
    assert init_kwargs["config"] == {"arch": "chain", "head.hidden": 8}
    assert ("log", "chain-dwa-s0", 2, epoch_values(entry)) in calls
    assert ("client", (tmp_path / "logs" / "mlruns").resolve().as_uri()) in calls      # a local file store
    assert ("metric", "id-chain-dwa-s1", "val/type_uar", 0.5, 2) in calls
    assert ("param", "id-chain-dwa-s0", "head.hidden", 8) in calls
    assert {c for c in calls if c[0] in ("finish", "terminated")} == {
        ("finish", "chain-dwa-s0"), ("finish", "chain-dwa-s1"),
        ("terminated", "id-chain-dwa-s0"), ("terminated", "id-chain-dwa-s1")}
    monkeypatch.setenv("WANDB_MODE", "online")      # the user's own choice wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example")
    calls.clear()
    with HeadsTracker(["wandb", "mlflow"], tmp_path / "logs") as t:
        t("r", 1, entry)
    assert calls[0][1]["mode"] == "online" and ("client", "http://tracking.example") in calls
