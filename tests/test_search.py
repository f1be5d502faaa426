"""`avb heads search`: Optuna trials asked in batches and trained as stacked runs, resumable, deterministic."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_signal_cache

optuna = pytest.importorskip("optuna")

from cache.reader import load_cache  # noqa: E402
from extract.app.cli import main as avb  # noqa: E402
from heads.model.architectures import HeadConfig  # noqa: E402
from heads.training import search as search_mod  # noqa: E402
from heads.training.joint import TrainConfig, train_runs  # noqa: E402
from heads.training.search import SearchError, SearchSettings, read_space, run_search  # noqa: E402

torch.set_num_threads(1)

SPACE = """\
lr: {low: 1.0e-4, high: 3.0e-3, log: true}
dropout: {low: 0.0, high: 0.5}
weighting: [uniform, dwa, rruw, druw]
druw_beta: {low: 0.0, high: 2.0}
"""
FIXED = TrainConfig(epochs=2, batch_size=8, head=HeadConfig(hidden=16, chain_order=("type", "two", "high",
                                                                                     "culture")))


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("cache") / "signal.h5", sizes=(96, 48, 16))


def trials(path: Path) -> list[dict[str, str]]:
    with open(path / "trials.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def search(cache, out, n, batch=8, pruner="none", space=SPACE):
    (out.parent / "space.yaml").write_text(space)
    dims = read_space(out.parent / "space.yaml", search_mod.tasks_of(cache.attrs))
    return run_search(cache, out, dims, FIXED, SearchSettings(n, batch, "tpe", pruner, seed=3), device="cpu",
                      progress=False, say=lambda _: None)


def test_sixteen_trials_in_batches_of_eight_are_two_stacks_and_each_trial_equals_its_run_alone(
        cache_file, tmp_path, monkeypatch):
    calls = []
    real = search_mod.train_runs
    monkeypatch.setattr(search_mod, "train_runs", lambda cache, configs, dirs, **kw: (
        calls.append(len(configs)), real(cache, configs, dirs, **kw))[1])
    cache = load_cache(cache_file)
    study = search(cache, tmp_path / "s", 16)
    assert calls == [8, 8]                       # lr, dropout, weighting and its options all stack
    loaded = optuna.load_study(study_name=search_mod.STUDY_NAME, storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert len(loaded.trials) == 16 and all(t.state.name == "COMPLETE" for t in loaded.trials)
    rows = trials(tmp_path / "s")
    assert [int(r["number"]) for r in rows] == list(range(16))
    assert all((tmp_path / "s" / r["run"] / "metrics.json").is_file() for r in rows)
    assert {r["druw_beta"] != "" for r in rows if r["weighting"] == "druw"} <= {True}
    assert all(r["druw_beta"] == "" for r in rows if r["weighting"] != "druw")
    best = study.best_trial
    run = tmp_path / "s" / f"trial-{best.number:04d}"
    config = json.loads((run / "config.json").read_text())
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("run_format", "cache", "cache_attrs")})
    assert cfg.lr == pytest.approx(best.params["lr"]) and cfg.head.dropout == pytest.approx(best.params["dropout"])
    alone = train_runs(cache, [cfg], [tmp_path / "alone"], progress=False)[0]
    assert alone["mean"] == pytest.approx(best.value, abs=1e-5)
    # the best trial is an ordinary run folder: avb ensemble takes it
    res = CliRunner().invoke(avb, ["ensemble", str(run), "--out", str(tmp_path / "ens"), "--ci", "0"])
    assert res.exit_code == 0, res.output
    check_report(tmp_path / "s", tmp_path / "r")


def check_report(search_dir: Path, out: Path) -> None:
    """avb report draws the optimisation history and Optuna's parameter importances of a search."""
    pytest.importorskip("matplotlib")
    res = CliRunner().invoke(avb, ["report", str(search_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    figure = out / f"search_{search_dir.name}.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (out / "index.html").read_text()
    assert "optimisation history and parameter importances" in index and "trials.csv" in index
    from heads.analysis.report import search_importances

    importances = search_importances(search_dir)
    assert set(importances) <= {"lr", "dropout", "weighting", "druw_beta"} and importances
    assert sum(importances.values()) == pytest.approx(1.0)


def test_the_same_seed_gives_the_same_study_and_a_killed_search_resumes(cache_file, tmp_path):
    cache = load_cache(cache_file)
    search(cache, tmp_path / "a", 8, batch=4)
    search(cache, tmp_path / "b", 4, batch=4)                 # stopped after one batch ...
    study = optuna.load_study(study_name=search_mod.STUDY_NAME, storage=f"sqlite:///{tmp_path / 'b' / 'study.db'}")
    killed = study.ask()                                      # ... and a trial left RUNNING by a kill
    killed.suggest_float("lr", 1e-4, 3e-3, log=True)
    (tmp_path / "b" / f"trial-{killed.number:04d}").mkdir()  # with a half-written folder
    search(cache, tmp_path / "b", 8, batch=4)                 # the same command again
    a, b = trials(tmp_path / "a"), trials(tmp_path / "b")
    assert [r["lr"] for r in a[:4]] == [r["lr"] for r in b[:4]]            # same seed, same trials
    assert b[4]["state"] == "FAIL" and sum(r["state"] == "COMPLETE" for r in b) == 8
    assert not (tmp_path / "b" / "trial-0004").exists()
    rerun = next(r for r in b[5:] if r["lr"] == b[4]["lr"])                 # enqueued again, same params
    assert rerun["state"] == "COMPLETE" and (tmp_path / "b" / rerun["run"]).is_dir()


def _pruning(monkeypatch, pruner) -> list[tuple[int, int]]:
    """Searches use `pruner`; returns the (trial number, epoch) of every report a trial made."""
    reports: list[tuple[int, int]] = []
    real_train, real_study = search_mod.train_runs, search_mod._study

    def recording(cache, configs, dirs, tracker, **kw):
        def track(name, epoch, entry):
            reports.append((int(name.rsplit("-trial", 1)[1]), epoch))
            tracker(name, epoch, entry)
        return real_train(cache, configs, dirs, tracker=track, **kw)

    def pruning_study(optuna_, out, settings, rank=0):
        study = real_study(optuna_, out, settings, rank)
        study.pruner = pruner
        return study

    monkeypatch.setattr(search_mod, "train_runs", recording)
    monkeypatch.setattr(search_mod, "_study", pruning_study)
    return reports


class EvenTrials(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number % 2 == 0


def test_pruned_trials_leave_their_stack_and_the_others_end_as_alone(cache_file, tmp_path, monkeypatch):
    reports = _pruning(monkeypatch, EvenTrials())
    cache = load_cache(cache_file)
    study = search(cache, tmp_path / "p", 4, batch=4)
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE"] * 2
    assert sorted(reports) == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]   # pruned: no epoch 2
    assert sorted(p.name for p in (tmp_path / "p").glob("trial-*")) == ["trial-0001", "trial-0003"]
    for trial in study.trials[1::2]:   # trained on beside the pruned ones until epoch 1, alone after
        config = json.loads((tmp_path / "p" / f"trial-{trial.number:04d}" / "config.json").read_text())
        cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("run_format", "cache",
                                                                                   "cache_attrs")})
        alone = train_runs(cache, [cfg], [tmp_path / "alone" / cfg.name], progress=False)[0]
        assert alone["mean"] == pytest.approx(trial.value, abs=1e-5)


def test_a_stack_whose_trials_are_all_pruned_ends_there(cache_file, tmp_path, monkeypatch):
    reports = _pruning(monkeypatch, optuna.pruners.ThresholdPruner(lower=2.0))   # a mean never reaches 2
    study = search(load_cache(cache_file), tmp_path / "p", 4, batch=4)
    assert all(t.state.name == "PRUNED" for t in study.trials)
    assert sorted(reports) == [(n, 1) for n in range(4)]
    assert not list((tmp_path / "p").glob("trial-*"))


@pytest.mark.parametrize(("space", "message"), [
    ("colour: [1, 2]\n", "field colour: unknown field"),
    ("lr: {low: 3, high: 1}\n", "field lr: expected low < high"),
    ("lr: {low: 0, high: 1, log: true}\n", "field lr: a log range needs low > 0"),
    ("weighting: [uniform, gradnorm]\n", "field weighting: unknown value 'gradnorm'"),
    ("chain_order: [type+two]\n", "field chain_order: task order"),
    ("- lr\n", "a space file maps fields to ranges or lists"),
])
def test_bad_space_files_are_one_line(tmp_path, space, message):
    from heads.tasks import AVB

    (tmp_path / "space.yaml").write_text(space)
    with pytest.raises(SearchError, match=message.replace("(", r"\(")):
        read_space(tmp_path / "space.yaml", AVB)


def test_cli_prints_the_best_trial_as_a_train_command(cache_file, tmp_path):
    (tmp_path / "space.yaml").write_text("lr: [0.001, 0.003]\nchain_order: all\narch: [chain]\n")
    res = CliRunner().invoke(avb, ["heads", "search", "--cache", str(cache_file), "--out", str(tmp_path / "s"),
                                   "--space", str(tmp_path / "space.yaml"), "--trials", "4", "--batch", "4",
                                   "--epochs", "1", "--hidden", "16", "--sampler", "random", "--no-progress"])
    assert res.exit_code == 0, res.output
    command = res.output.strip().splitlines()[-1].strip()
    assert command.startswith("avb heads train --cache") and "--arch chain" in command
    args = command.split()[1:]
    out = tmp_path / "again"
    args[args.index("--out") + 1] = str(out)
    assert CliRunner().invoke(avb, args + ["--no-progress"]).exit_code == 0
    rows = trials(tmp_path / "s")
    top = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["value"]))
    assert json.loads((out / "metrics.json").read_text())["mean"] == pytest.approx(float(top["value"]), abs=1e-5)
    assert np.isfinite(float(top["value"]))


def test_a_trial_whose_settings_cannot_train_fails_alone(cache_file, tmp_path):
    tasks = search_mod.tasks_of(load_cache(cache_file, layers=[]).attrs)
    fixed = TrainConfig(arch="branch", epochs=1, head=HeadConfig(n_heads=4, branch_blocks=1,
                                                                 chain_order=("type", "two", "high", "culture")))
    (tmp_path / "space.yaml").write_text("hidden: [6, 8]\n")          # BRANCH with 4 heads: 6 cannot split
    lines: list[str] = []
    study = run_search(load_cache(cache_file), tmp_path / "s", read_space(tmp_path / "space.yaml", tasks), fixed,
                       SearchSettings(3, 4, "random", "none"), device="cpu", progress=False, say=lines.append)
    states = [(t.state.name, t.params["hidden"]) for t in study.trials]
    assert {h for s, h in states if s == "FAIL"} == {6} and {h for s, h in states if s == "COMPLETE"} == {8}
    assert any("hidden 6 must be divisible by n_heads 4" in line for line in lines)
    (tmp_path / "bad.yaml").write_text("hidden: [6]\n")
    with pytest.raises(SearchError, match="every trial of a batch has settings that cannot train"):
        run_search(load_cache(cache_file), tmp_path / "t", read_space(tmp_path / "bad.yaml", tasks), fixed,
                   SearchSettings(2, 2, "random", "none"), device="cpu", progress=False, say=lines.append)


def test_two_launched_processes_share_one_study(cache_file, tmp_path):
    """`accelerate launch --num_processes 2 -m heads.search`: two workers on one study, together exactly the
    trials asked for, each trial trained by one of them; process 0 prints the best trial."""
    from helpers import accelerate_launch

    (tmp_path / "space.yaml").write_text("lr: {low: 1.0e-4, high: 3.0e-3, log: true}\nweighting: [uniform, dwa]\n")
    out = tmp_path / "s"
    proc = accelerate_launch("heads.search", [
        "--cache", str(cache_file), "--out", str(out), "--space", str(tmp_path / "space.yaml"), "--trials", "6",
        "--batch", "2", "--epochs", "1", "--hidden", "16", "--pruner", "none", "--no-progress"],
        processes=2, cwd=tmp_path, timeout=300)
    study = optuna.load_study(study_name=search_mod.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    trained_by = [json.loads((out / f"trial-{n:04d}" / "metrics.json").read_text())["trained_on"]["process"]
                  for n in range(6)]
    assert set(trained_by) == {"0 of 2", "1 of 2"}
    assert [r["state"] for r in trials(out)] == ["COMPLETE"] * 6
    assert proc.stdout.count("reproduce it alone with:") == 1
    assert len({(t.params["lr"], t.params["weighting"]) for t in study.trials}) == 6   # no trial drawn twice
