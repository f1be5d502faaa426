"""The ablation grid: one run folder per cell, resumable, Table I-style results, and the `avb heads` CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from grids import grid_config
from helpers import make_signal_cache

from cache.format import CacheError
from cache.reader import load_cache
from extract.app.cli import main as avb
from heads import names
from heads.analysis.bootstrap import BootstrapConfig, resample_indices, score_intervals
from heads.analysis.comparison import val_arrays
from heads.analysis.ensemble import read_split_predictions
from heads.analysis.tables import results_markdown, summarise
from heads.metrics import score_task
from heads.model.architectures import HeadConfig, build_head
from heads.tasks import AVB
from heads.training import grid as ablate_mod
from heads.training.grid import AblationError, joint_groups, run_grid, run_state_bytes

torch.set_num_threads(1)

HEAD = HeadConfig(hidden=32, n_heads=4, branch_blocks=2)
GRID = dict(archs=("vanilla", "chain"), weightings=("uniform", "rruw"), seeds=(0, 1), epochs=2, head=HEAD)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("cache") / "signal.h5", sizes=(160, 100, 40))


@pytest.fixture(scope="module")
def grid_dir(cache_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid")
    run_grid(grid_config(cache_file, **GRID), out, progress=False)
    return out


class CountingTrainRuns:
    """Stands in for train_runs and records what the grid asked it to train."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, cache, configs, out_dirs, **kw):
        self.calls.append([c.name for c in configs])
        return self.real(cache, configs, out_dirs, **kw)


def test_grid_writes_one_folder_per_run_and_results(grid_dir):
    names = sorted(p.name for p in grid_dir.iterdir() if p.is_dir())
    assert names == sorted(f"{a}-{w}-s{s}" for a in ("vanilla", "chain") for w in ("uniform", "rruw") for s in (0, 1))
    with open(grid_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cis = [f"{k}_ci_{end}" for k in (*AVB.metric_keys, "mean") for end in ("low", "high")]
    assert list(rows[0]) == ["arch", "weighting", "seed", *AVB.metric_keys, "mean", "best_epoch", *cis]
    assert [(r["arch"], r["weighting"], r["seed"]) for r in rows][:4] == [
        ("vanilla", "uniform", "0"), ("vanilla", "uniform", "1"), ("vanilla", "rruw", "0"), ("vanilla", "rruw", "1")]
    for row in rows:  # every row is its run's metrics.json
        metrics = json.loads((grid_dir / f"{row['arch']}-{row['weighting']}-s{row['seed']}" / "metrics.json")
                             .read_text())
        for key in (*AVB.metric_keys, "mean"):
            assert float(row[key]) == metrics[key]
        assert int(row["best_epoch"]) == metrics["best_epoch"]
    results = json.loads((grid_dir / "results.json").read_text())
    assert len(results["runs"]) == 8 and len(results["summary"]) == 4
    config = json.loads((grid_dir / "config.json").read_text())
    assert config["archs"] == ["vanilla", "chain"] and config["seeds"] == [0, 1] and config["run"]["epochs"] == 2
    assert config["run"]["head"]["hidden"] == 32 and "arch" not in config["run"]["head"]
    assert not {"arch", "weighting", "seed", "weighting_options"} & set(config["run"])   # set per run


def test_summary_takes_the_best_seed_and_mean_std(grid_dir):
    results = json.loads((grid_dir / "results.json").read_text())
    for cell in results["summary"]:
        runs = [r for r in results["runs"] if (r["arch"], r["weighting"]) == (cell["arch"], cell["weighting"])]
        best = max(runs, key=lambda r: r["mean"])
        assert cell["best_seed"] == best["seed"] and cell["best"]["two_ccc"] == best["two_ccc"]
        values = np.array([r["high_pearson"] for r in runs])
        assert cell["mean"]["high_pearson"] == pytest.approx(values.mean(), abs=1e-12)
        assert cell["std"]["high_pearson"] == pytest.approx(values.std(ddof=1), abs=1e-12)


def test_results_markdown_is_grouped_like_table_one(grid_dir):
    text = (grid_dir / "results.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("| Model | A-VB-TYPE UAR | A-VB-TWO CCC |")
    groups = [i for i, line in enumerate(lines) if line.startswith("| **")]
    assert [lines[i].split("|")[1].strip() for i in groups] == ["**Uniform Weighting**",
                                                                "**Restrained Revised Uncertainty Weighting**"]
    assert [lines[i].split("|")[1].strip() for i in (groups[0] + 1, groups[0] + 2)] == ["*VANILLA*", "*CHAIN*"]
    # exactly the best value of each column is bold (ties aside), and it is the column maximum
    results = json.loads((grid_dir / "results.json").read_text())
    body = [line for line in lines if line.startswith("| *") and not line.startswith("| **")]
    for col, key in enumerate(("type_uar", "two_ccc", "two_pearson", "high_ccc"), start=2):
        bold = [line.split("|")[col].strip() for line in body if line.split("|")[col].strip().startswith("**")]
        best = max(c["best"][key] for c in results["summary"])
        assert bold and all(b.startswith(f"**{best:.4f}".replace("0.", ".", 1)) for b in bold), key
    assert " ± " in body[0]


def test_intervals_and_paired_comparisons_follow_from_the_runs_val_files(grid_dir, cache_file):
    """Every run's interval equals bootstrapping its own Val files alone; the paired win fractions equal a slow
    loop that rescores the two configurations' best runs on each resample with heads.metrics."""
    results = json.loads((grid_dir / "results.json").read_text())
    assert results["bootstrap"]["n_boot"] == 1000 and results["bootstrap"]["level"] == 0.95
    cache = load_cache(cache_file, layers=[])
    val_ids, val_labels = val_arrays(cache)
    assert val_ids == sorted(val_ids) and len(val_ids) == 100
    with open(grid_dir / "results.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    systems = {}
    for row, line in zip(results["runs"], csv_rows):
        name = f"{row['arch']}-{row['weighting']}-s{row['seed']}"
        systems[name] = read_split_predictions(grid_dir / name / "predictions" / "val", AVB).reindexed(val_ids)
        alone = score_intervals(AVB, val_labels, systems[name], BootstrapConfig())
        for key in (*AVB.metric_keys, "mean"):
            assert row[f"{key}_ci"] == pytest.approx(alone[key], abs=1e-12), (name, key)
            assert [float(line[f"{key}_ci_low"]), float(line[f"{key}_ci_high"])] == row[f"{key}_ci"]
            assert row[f"{key}_ci"][0] - 1e-6 <= row[key] <= row[f"{key}_ci"][1] + 1e-6
    summary = results["summary"]
    for key in ("type_uar", "high_ccc", "mean"):
        top = max(summary, key=lambda c: c["best"][key])
        assert results["bootstrap"]["best"][key] == f"{top['weighting']}-{top['arch']}"
        assert [c["win_fraction"][key] for c in summary].count(None) == 1 and top["win_fraction"][key] is None
        names = [f"{r['arch']}-{r['weighting']}-s{r['seed']}" for r in results["runs"]]
        for cell in summary:
            rep = f"{cell['arch']}-{cell['weighting']}-s{cell['best_seed']}"
            assert cell["best_ci"][key] == results["runs"][names.index(rep)][f"{key}_ci"]
    # the win fractions of one task by the obvious loop: rescore both best runs on each resample, ties count half
    top = max(summary, key=lambda c: c["best"]["high_ccc"])
    best_run = f"{top['arch']}-{top['weighting']}-s{top['best_seed']}"
    for cell in summary:
        if cell is top:
            continue
        run = f"{cell['arch']}-{cell['weighting']}-s{cell['best_seed']}"
        wins = 0.0
        for b in range(1000):
            idx = resample_indices(100, b, 0)
            a, c = (score_task(AVB["high"], val_labels["high"][idx], systems[r]["high"][idx])["high_ccc"]
                    for r in (run, best_run))
            wins += 1.0 if a > c else 0.5 if a == c else 0.0
        assert cell["win_fraction"]["high_ccc"] == pytest.approx(wins / 1000, abs=1e-12), run
    text = (grid_dir / "results.md").read_text()
    table_one = [line for line in text.splitlines() if line.startswith("| *") and not line.startswith("| **")]
    low, high = summary[0]["best_ci"]["type_uar"]
    assert f"[{low:.4f}, {high:.4f}]".replace("0.", ".") in table_one[0]
    paired = [line for line in text.splitlines() if line.startswith("| Uniform Weighting · ")]
    assert [line.split("|")[1].strip() for line in paired] == ["Uniform Weighting · VANILLA",
                                                               "Uniform Weighting · CHAIN"]
    assert sum(line.count("| best ") for line in text.splitlines() if " · " in line) == 5   # 4 tasks + mean
    assert text.splitlines()[-1].endswith("Best value per column in bold.") and "paired bootstrap" in text


def test_markdown_formatting_by_hand():
    rows = [
        {"arch": "chain", "weighting": "dwa", "seed": s, "type_uar": u, "two_ccc": 0.7, "two_pearson": 0.71,
         "high_ccc": 0.72, "high_pearson": 0.73, "culture_ccc": c, "culture_pearson": 0.6, "mean": m,
         "best_epoch": 3}
        for s, u, c, m in ((0, 0.5, 0.60, 0.60), (1, 0.6, 0.50, 0.62))
    ] + [{"arch": "vanilla", "weighting": "uniform", "seed": 0, "type_uar": 0.55, "two_ccc": -0.01,
          "two_pearson": 0.1, "high_ccc": 0.2, "high_pearson": 0.3, "culture_ccc": 0.65, "culture_pearson": 0.5,
          "mean": 0.3, "best_epoch": 1}]
    text = results_markdown(AVB, summarise(AVB, rows))
    lines = text.splitlines()
    assert lines[2] == "| **Uniform Weighting** |" + " |" * 8
    assert lines[3].startswith("| *VANILLA* | .5500 | -.0100 | .1000 |")
    assert lines[4] == "| **Dynamic Weight Average** |" + " |" * 8
    # seed 1 has the better mean: its values, bold where best; then mean ± sample std over the two seeds
    assert lines[5].startswith("| *CHAIN* | **.6000** (.5500 ± .0707) | **.7000** (.7000 ± .0000) |")
    assert "| .5000 (.5500 ± .0707) |" in lines[5]          # culture CCC of seed 1, not the best column value
    assert "| **.6500** |" in lines[3]                       # vanilla's culture CCC is the column's best
    assert "mean ± sample std over seeds" in text


def test_rerun_skips_finished_runs_and_retrains_only_what_is_missing(cache_file, tmp_path, monkeypatch):
    counter = CountingTrainRuns(ablate_mod.train_runs)
    monkeypatch.setattr(ablate_mod, "train_runs", counter)
    grid = dict(GRID, archs=("vanilla",), weightings=("uniform", "dwa"), seeds=(0,))
    first = run_grid(grid_config(cache_file, **grid), tmp_path, progress=False)
    assert counter.calls == [["vanilla-uniform-s0", "vanilla-dwa-s0"]]      # one joint call per arch
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")}

    again = run_grid(grid_config(cache_file, **grid), tmp_path, progress=False)
    assert counter.calls == [["vanilla-uniform-s0", "vanilla-dwa-s0"]]      # nothing trained
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")} == stamp

    (tmp_path / "vanilla-dwa-s0" / "metrics.json").unlink()                 # an interrupted run
    run_grid(grid_config(cache_file, **dict(grid, seeds=(0, 1))), tmp_path, progress=False)   # ... and a grown grid
    assert counter.calls[1] == ["vanilla-uniform-s1", "vanilla-dwa-s0", "vanilla-dwa-s1"]

    # a changed config: all redone
    run_grid(grid_config(cache_file, **dict(grid, seeds=(0, 1), epochs=3)), tmp_path, progress=False)
    assert sorted(counter.calls[2]) == sorted(["vanilla-uniform-s0", "vanilla-dwa-s0", "vanilla-uniform-s1",
                                               "vanilla-dwa-s1"])
    assert json.loads((tmp_path / "vanilla-dwa-s1" / "config.json").read_text())["epochs"] == 3


def test_joint_groups_by_hand():
    # HUME-scale BRANCH: 132 MiB per run, 640 MiB budget -> room for 4 -> 3 equal groups of 4
    assert joint_groups(12, 132, 640) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert joint_groups(12, 15, 640) == [list(range(12))]                    # VANILLA/CHAIN: one group
    assert joint_groups(12, 10, 50) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # room for 5: 4+4+4
    assert joint_groups(7, 10, 30) == [[0, 1, 2], [3, 4], [5, 6]]           # equal sizes, larger first
    assert joint_groups(3, 100, 50) == [[0], [1], [2]]                      # a run over budget trains alone
    assert joint_groups(5, 100, 0) == [[0, 1, 2, 3, 4]]                     # 0: no limit
    assert joint_groups(0, 100, 50) == []


def test_run_state_bytes_is_five_float32_arrays_per_parameter():
    dims = {"cnn": 16, "hidden_0": 24, "hidden_1": 24, "hidden_2": 24}
    for arch in ("vanilla", "branch"):
        head = HeadConfig(arch=arch, hidden=32, n_heads=4, branch_blocks=2)
        stacked = sum(p.numel() for p in build_head(head, dims, [0, 1, 2], AVB).parameters())
        assert run_state_bytes(head, dims, AVB) == 5 * 4 * stacked // 3
    # VANILLA by hand: per task Linear(24, 32), LayerNorm(32) (weight + bias), Linear(32, out), outs 8, 2, 10, 40
    head = HeadConfig(arch="vanilla", hidden=32)
    assert run_state_bytes(head, dims, AVB) == 20 * sum(24 * 32 + 32 + 2 * 32 + 32 * k + k for k in (8, 2, 10, 40))


def test_memory_budget_splits_an_arch_into_joint_groups_with_the_joint_results(cache_file, tmp_path, monkeypatch):
    grid = dict(GRID, archs=("vanilla",), weightings=("uniform", "dwa", "rruw"), seeds=(0,))
    joint = run_grid(grid_config(cache_file, **grid, max_group_bytes=0), tmp_path / "joint", progress=False)

    seen = []   # (runs of the call, the marker's names during it)
    real = ablate_mod.train_runs

    def recording(cache, configs, out_dirs, **kw):
        marker = Path(out_dirs[0]).parent / f".training-{configs[0].name}.json"
        seen.append(([c.name for c in configs], json.loads(marker.read_text())))
        return real(cache, configs, out_dirs, **kw)

    monkeypatch.setattr(ablate_mod, "train_runs", recording)
    per_run = run_state_bytes(HEAD, {"cnn": 16, "hidden_0": 24, "hidden_1": 24, "hidden_2": 24}, AVB)
    out = tmp_path / "grouped"
    budget = 2 * per_run + per_run // 2   # room for 2
    grouped = run_grid(grid_config(cache_file, **grid, max_group_bytes=budget), out, progress=False)
    names = ["vanilla-uniform-s0", "vanilla-dwa-s0", "vanilla-rruw-s0"]
    assert seen == [(names[:2], names[:2]), (names[2:], names[2:])]          # 2 + 1; the marker names the call
    assert not list(out.glob(".training-*.json"))
    assert json.loads((out / "config.json").read_text())["max_group_bytes"] == budget
    for a, b in zip(joint, grouped):
        assert (a["arch"], a["weighting"], a["seed"]) == (b["arch"], b["weighting"], b["seed"])
        for key in (*AVB.metric_keys, "mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["weighting"], key)

    run_grid(grid_config(cache_file, **grid, max_group_bytes=budget), out, progress=False)
    assert len(seen) == 2                                                    # finished: nothing trained

    # killed inside the first group after it wrote one run folder: that whole group is retrained, not more
    (out / "vanilla-dwa-s0" / "metrics.json").unlink()
    (out / ".training-vanilla-uniform-s0.json").write_text(json.dumps(names[:2]))
    run_grid(grid_config(cache_file, **grid, max_group_bytes=budget), out, progress=False)
    assert seen[2:] == [(names[:2], names[:2])]
    assert not list(out.glob(".training-*.json"))
    # a marker whose runs all finished (killed after the call's last write) is stale: removed, nothing retrained
    (out / ".training-vanilla-uniform-s0.json").write_text(json.dumps(names[:2]))
    run_grid(grid_config(cache_file, **grid, max_group_bytes=budget), out, progress=False)
    assert len(seen) == 3 and not list(out.glob(".training-*.json"))


def test_grid_rejects_bad_specs(cache_file, tmp_path):
    with pytest.raises(AblationError, match="unknown architecture 'mlp'; expected one of vanilla, chain, branch"):
        grid_config(cache_file, archs=("mlp",))
    with pytest.raises(AblationError, match="seeds listed twice: 0, 0"):
        grid_config(cache_file, seeds=(0, 0))
    with pytest.raises(CacheError, match="no such file"):
        run_grid(grid_config(tmp_path / "missing.h5"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_ablate_prints_table_and_train_writes_a_run(cache_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(tmp_path / "g"),
                              "--archs", "vanilla", "--weightings", "uniform,druw", "--seeds", "0", "--epochs", "2",
                              "--hidden", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| **Dynamic Restrained Uncertainty Weighting** |" in res.output
    assert (tmp_path / "g" / "vanilla-druw-s0" / "metrics.json").is_file()

    res = runner.invoke(avb, ["heads", "train", "--cache", str(cache_file), "--out", str(tmp_path / "r"),
                              "--arch", "chain", "--weighting", "dwa", "--seed", "3", "--epochs", "2",
                              "--hidden", "16", "--chain-order", "high,type,two,culture", "--no-progress"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["arch"], config["weighting"], config["seed"]) == ("chain", "dwa", 3)
    assert config["head"]["chain_order"] == ["high", "type", "two", "culture"] and config["head"]["hidden"] == 16
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert f"mean             {metrics['mean']:.4f}" in res.output


def test_cli_max_group_mib_defaults_to_the_library_budget_and_rejects_negatives(cache_file, tmp_path):
    import torch

    from heads.cli import ablate_command

    option = next(p for p in ablate_command.params if p.name == "max_group_mib")
    assert option.default is None                       # the library decides, by device
    assert ablate_mod.default_group_bytes(torch.device("cpu")) == names.DEFAULT_MAX_GROUP_BYTES == 640 * 2**20
    out = tmp_path / "default"
    res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(out), "--archs",
                                   "vanilla", "--weightings", "uniform", "--epochs", "1", "--hidden", "8",
                                   "--no-progress", "--ci", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["max_group_bytes"] == 640 * 2**20
    res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(tmp_path / "g"),
                                   "--max-group-mib", "-1"])
    assert res.exit_code == 2 and "Invalid value for '--max-group-mib'" in res.output


def test_cli_errors_are_one_line(cache_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(avb, ["heads", "train", "--cache", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and res.output.strip() == f"Error: {tmp_path / 'nope.h5'}: no such file"
    res = runner.invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(tmp_path / "g"),
                              "--weightings", "uniform,gradnorm"])
    assert res.exit_code == 2 and "unknown weighting 'gradnorm'" in res.output
    res = runner.invoke(avb, ["heads", "train", "--cache", str(cache_file), "--out", str(tmp_path / "r"),
                              "--chain-order", "type,two"])
    assert res.exit_code == 2 and "must name each of type, two, high, culture exactly once" in res.output
