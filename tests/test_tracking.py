"""Experiment tracking of stage 2, with the real packages, read back the way their users read them: TensorBoard
event files (one log folder per run), an offline W&B run (`wandb leet inspect`), the MLflow store
(`mlflow.search_runs`) each equal the runs' metrics.json histories; the user's own MLflow store and W&B mode win;
a tracker whose package is missing is refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_signal_cache, mlflow_history, mlflow_runs, wandb_offline_runs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from extract.app.cli import main as avb
from heads.runs import RUN_FORMAT, history_entry
from heads.tasks import AVB
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
    expected_tags = {"train/loss", "lr/head", *(f"train/loss_{t}" for t in AVB.names),
                     *(f"loss_weight/{t}" for t in AVB.names), *(f"val/{k}" for k in (*AVB.metric_keys, "mean"))}
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

def assert_history_logged(logged: list[tuple[int, float]], run_dir: Path, key: str) -> None:
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [s for s, _ in logged] == [h["epoch"] for h in history], key
    assert [v for _, v in logged] == pytest.approx([epoch_values(h)[key] for h in history], rel=1e-6, abs=1e-7)


def test_heads_ablate_logs_each_run_to_a_local_mlflow_store_that_search_runs_reads_back(cache_file, tmp_path):
    """The default MLflow store is OUT/tracking/mlflow.db (MLflow 3 refuses new file stores): one MLflow run per
    head run, its config as parameters, every epoch's values at their epoch."""
    out = tmp_path / "grid"
    res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(out), "--archs",
                                   "vanilla", "--weightings", "uniform,dwa", "--report-to", "mlflow", "--ci", "0",
                                   *COMMON])
    assert res.exit_code == 0, res.output
    logs = out / "tracking"
    runs = mlflow_runs(logs, "avb-heads")
    assert sorted(runs) == ["vanilla-dwa-s0", "vanilla-uniform-s0"]
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["weighting"] == name.split("-")[1] and run.data.params["head.hidden"] == "16"
        for key in ("val/mean", "train/loss", "loss_weight/high"):
            assert_history_logged(mlflow_history(logs, run, key), out / name, key)
    assert not (logs / "mlruns").exists()


def test_heads_train_logs_to_an_offline_wandb_run_that_wandb_reads_back(cache_file, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(avb, ["heads", "train", "--cache", str(cache_file), "--out", str(out), "--weighting",
                                   "druw", "--report-to", "wandb", *COMMON])
    assert res.exit_code == 0, res.output
    runs = wandb_offline_runs(out / "tracking")          # offline: WANDB_MODE is unset in the tests
    assert list(runs) == ["vanilla-druw-s0"]
    run = runs["vanilla-druw-s0"]
    assert run["project"] == "avb-heads" and run["config"]["weighting"] == "druw"
    assert run["config"]["head.hidden"] == 16
    for key in ("val/mean", "train/loss", "loss_weight/type"):
        assert_history_logged([(step, item[key]) for step, item in run["history"]], out, key)


def test_the_users_tracking_uri_and_wandb_mode_win(tmp_path, monkeypatch):
    entry = history_entry(epoch=1, step=10, loss=1.5, lr={"head": 1e-3}, task_losses=dict.fromkeys(AVB.names, 0.25),
                          weights=dict.fromkeys(AVB.names, 1.0), val={"type_uar": 0.5, "mean": 0.4})
    own_store = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{own_store}")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logs = tmp_path / "logs"
    with HeadsTracker(["wandb", "mlflow"], logs) as t:
        t("chain-dwa-s0", 1, entry)
    assert own_store.is_file() and not (logs / "mlflow.db").exists() and not (logs / "wandb").exists()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{own_store}")
    [run] = mlflow.search_runs(experiment_names=["avb-heads"], output_format="list")
    assert run.info.run_name == "chain-dwa-s0" and run.data.metrics["val/type_uar"] == 0.5
