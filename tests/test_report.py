"""`avb report`: the figures are real PNGs, the index links every one of them and the data files, and the
numbers in the grid and tables are the runs' numbers -- for A-VB runs and for runs of a corpus of its own."""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from heads.analysis.report import (
    ablation_grid,
    collect_inputs,
    markdown_table_html,
    report_command,
)
from heads.runs import RUN_FORMAT
from heads.tasks import AVB, Task, TaskSet

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ("type", "two", "high", "culture")
HEADLINE = {"type": "type_uar", "two": "two_ccc", "high": "high_ccc", "culture": "culture_ccc"}
# A corpus of its own: a 3-class task and a 2-column regression task rated on [1, 9].
FARM = TaskSet((Task("call", "classification", ("Call",), ("bark", "meow", "moo")),
                Task("mood", "regression", ("Valence", "Arousal"), low=1.0, high=9.0)), name="farm")


def score(arch: str, weighting: str, seed: int, task: str, names: tuple[str, ...] = TASKS) -> float:
    """A deterministic, distinct score per run and task, so grid means can be checked by hand."""
    return round(0.1 * ("vanilla", "chain").index(arch) + 0.01 * ("uniform", "dwa", "druw").index(weighting)
                 + 0.001 * seed + 0.1 * names.index(task), 6)


def write_run(folder: Path, arch: str, weighting: str, seed: int, epochs: int = 4, complete: bool = True,
              tasks: TaskSet | None = None) -> Path:
    """A run folder; with `tasks`, its config records them with its cache attributes (else an A-VB run that
    recorded none)."""
    folder.mkdir(parents=True)
    (folder / "predictions" / "val").mkdir(parents=True)
    config = {"run_format": RUN_FORMAT, "arch": arch, "weighting": weighting, "seed": seed,
              "cache": "/nowhere/cache.h5"}
    if tasks is not None:
        config["cache_attrs"] = {"tasks": tasks.to_json()}
    (folder / "config.json").write_text(json.dumps(config))
    if not complete:
        return folder
    tasks = tasks or AVB
    names, headline = tasks.names, tasks.headline_keys
    history = []
    for epoch in range(1, epochs + 1):
        val = {headline[t]: score(arch, weighting, seed, t, names) * epoch / epochs for t in names}
        val["mean"] = float(np.mean(list(val.values())))
        history.append({"epoch": epoch, "loss": 1.0 / epoch,
                        "task_losses": {t: 1.0 / epoch for t in names},
                        "weights": {t: 1.0 + 0.1 * k * (epoch - 1) * (weighting != "uniform")
                                    for k, t in enumerate(names)},
                        "lr": 1e-3, "val": val})
    metrics = {headline[t]: score(arch, weighting, seed, t, names) for t in names}
    metrics["mean"] = float(np.mean(list(metrics.values())))
    (folder / "metrics.json").write_text(json.dumps({**metrics, "best_epoch": epochs, "history": history}))
    return folder


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    grid = tmp_path / "ablation"
    for arch in ("vanilla", "chain"):
        for weighting in ("uniform", "dwa", "druw"):
            for seed in (0, 1):
                if (arch, weighting, seed) != ("chain", "druw", 1):
                    write_run(grid / f"{arch}-{weighting}-s{seed}", arch, weighting, seed)
    write_run(grid / "chain-druw-s1", "chain", "druw", 1, complete=False)
    (grid / "config.json").write_text("{}")
    (grid / "results.csv").write_text("arch,weighting,seed,type_uar\nvanilla,uniform,0,0.0\n")
    (grid / "results.json").write_text("{}")
    (grid / "results.md").write_text(
        "| Model | A-VB-TYPE UAR |\n|---|---|\n| **Uniform Weighting** | |\n| *VANILLA* | **.1234** (.1 ± .01) |\n\n"
        "Validation scores.\n")
    ens = tmp_path / "ens"
    ens.mkdir()
    runs = [grid / "vanilla-dwa-s0", grid / "chain-dwa-s1"]
    (ens / "metrics.json").write_text(json.dumps({"type_uar": 0.2, "two_ccc": 0.3, "high_ccc": 0.4,
                                                  "culture_ccc": 0.5, "mean": 0.35}))
    (ens / "members.json").write_text(json.dumps({
        "strategy": "combined",
        "tasks": {t: [{"run": str(runs[k % 2]), "weight": 1.0}] for k, t in enumerate(TASKS)},
        "runs": [{"run": str(r), "val": json.loads((r / "metrics.json").read_text())} for r in runs],
    }))
    return {"grid": grid, "ens": ens, "out": tmp_path / "report"}


def test_report_writes_valid_nontrivial_pngs_and_an_index_linking_each_figure_and_data_file(inputs):
    result = CliRunner().invoke(report_command, [str(inputs["grid"]), str(inputs["ens"]), "--out", str(inputs["out"])])
    assert result.exit_code == 0, result.output
    out = inputs["out"]
    expected = {"curves.png", "weights_uniform.png", "weights_dwa.png", "weights_druw.png", "ablation.png",
                "ensemble_ens.png"}
    assert {p.name for p in out.glob("*.png")} == expected
    index = (out / "index.html").read_text()
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5000, name
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the magic
        assert width >= 400 and height >= 200, name
        assert f"src='{name}'" in index and f"href='{name}'" in index
    # Every data link resolves to an existing file, and the ablation's tables and the ensemble files are there.
    hrefs = re.findall(r"href='([^']+)'", index)
    for href in hrefs:
        assert (out / href).resolve().is_file(), href
    linked = {Path(h).name for h in hrefs}
    assert {"results.csv", "results.json", "results.md", "members.json", "metrics.json"} <= linked
    assert f"Warning: skipping incomplete run {inputs['grid'] / 'chain-druw-s1'} (no metrics.json)" in result.stderr


def test_index_tables_show_the_runs_scores_and_the_ablations_table_one(inputs):
    assert CliRunner().invoke(report_command, [str(inputs["grid"]), str(inputs["ens"]), "--out",
                                               str(inputs["out"])]).exit_code == 0
    index = (inputs["out"] / "index.html").read_text()
    row = re.search(r"<tr><td>chain-dwa-s1</td>(.*?)</tr>", index).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[:4] == ["chain", "dwa", "1", "4"]
    assert [float(c) for c in cells[4:8]] == [score("chain", "dwa", 1, t) for t in TASKS]
    ens_row = re.search(r"<tr><td>ens</td>(.*?)</tr>", index).group(1)
    assert re.findall(r"<td>(.*?)</td>", ens_row)[-5:] == [".2000", ".3000", ".4000", ".5000", ".3500"]
    assert "<td><i>VANILLA</i></td><td><b>.1234</b> (.1 ± .01)</td>" in index
    assert "<p>Validation scores.</p>" in index


def test_ablation_grid_is_the_mean_over_seeds_per_arch_and_weighting(inputs):
    found = collect_inputs([inputs["grid"]])
    assert len(found.runs) == 11  # the incomplete run is left out
    assert all(run.tasks == AVB for run in found.runs)   # recorded no tasks: A-VB
    archs, weightings, grids = ablation_grid(found.runs, AVB)
    assert archs == ["chain", "vanilla"] and weightings == ["druw", "dwa", "uniform"]
    # chain/druw has only seed 0 (seed 1 is incomplete); every other cell averages seeds 0 and 1.
    assert grids["high"][0, 0] == pytest.approx(score("chain", "druw", 0, "high"))
    two = [score("vanilla", "dwa", seed, "two") for seed in (0, 1)]
    assert grids["two"][1, 1] == pytest.approx(sum(two) / 2)
    expected_mean = np.mean([score("vanilla", "uniform", s, t) for s in (0, 1) for t in TASKS])
    assert grids["mean"][1, 2] == pytest.approx(expected_mean)


def test_markdown_table_conversion_skips_the_separator_and_escapes_html():
    text = "| A | B |\n|---|:--:|\n| **x** | <y> & *z* |\n\nnote *here*\n"
    assert markdown_table_html(text) == (
        "<table>\n<thead><tr><th>A</th><th>B</th></tr></thead>\n<tbody>\n"
        "<tr><td><b>x</b></td><td>&lt;y&gt; &amp; <i>z</i></td></tr>\n</tbody>\n</table><p>note <i>here</i></p>")


def test_missing_matplotlib_gives_the_install_hint(inputs, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    result = CliRunner().invoke(report_command, [str(inputs["grid"]), "--out", str(inputs["out"])])
    assert result.exit_code == 1
    assert "Error: avb report needs matplotlib: pip install 'avb-heads[plot]'" in result.output
    assert not inputs["out"].exists()


def test_a_folder_without_runs_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(report_command, [str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'empty'}: not a run, ensemble, probe or ablation dir (no run dirs inside)" \
        in result.output


def test_runs_and_an_ensemble_of_a_corpus_of_its_own_get_one_panel_per_task(tmp_path):
    """Two tasks (a 3-class and a 2-column regression task): the curves, weights, ablation and ensemble
    figures, the grid and the tables follow the runs' recorded tasks, not A-VB's four."""
    grid = tmp_path / "farm"
    for arch in ("vanilla", "chain"):
        for weighting in ("uniform", "dwa"):
            for seed in (0, 1):
                write_run(grid / f"{arch}-{weighting}-s{seed}", arch, weighting, seed, tasks=FARM)
    ens = tmp_path / "ens"
    ens.mkdir()
    runs = [grid / "vanilla-dwa-s0", grid / "chain-dwa-s1"]
    (ens / "metrics.json").write_text(json.dumps({"call_uar": 0.6, "call_accuracy": 0.7, "call_f1": 0.5,
                                                  "mood_ccc": 0.4, "mood_pearson": 0.45, "mean": 0.5}))
    (ens / "members.json").write_text(json.dumps({
        "strategy": "combined",
        "tasks": {t: [{"run": str(runs[k % 2]), "weight": 1.0}] for k, t in enumerate(FARM.names)},
        "runs": [{"run": str(r), "val": json.loads((r / "metrics.json").read_text())} for r in runs],
    }))
    out = tmp_path / "report"
    result = CliRunner().invoke(report_command, [str(grid), str(ens), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = {"curves.png", "weights_uniform.png", "weights_dwa.png", "ablation.png", "ensemble_ens.png"}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name

    found = collect_inputs([grid])
    assert all(run.tasks == FARM for run in found.runs)
    archs, weightings, grids = ablation_grid(found.runs, FARM)
    assert sorted(grids) == ["call", "mean", "mood"]
    assert archs == ["chain", "vanilla"] and weightings == ["dwa", "uniform"]
    mood = [score("chain", "uniform", seed, "mood", FARM.names) for seed in (0, 1)]
    assert grids["mood"][0, 1] == pytest.approx(sum(mood) / 2)
    expected_mean = np.mean([score("vanilla", "dwa", s, t, FARM.names) for s in (0, 1) for t in FARM.names])
    assert grids["mean"][1, 0] == pytest.approx(expected_mean)

    index = (out / "index.html").read_text()
    assert "<title>farm results</title>" in index
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", index.split("Runs and ensembles")[1]).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["run", "arch", "weighting", "seed", "best_epoch",
                                                    "call_uar", "mood_ccc", "mean"]
    row = re.search(r"<tr><td>chain-dwa-s1</td>(.*?)</tr>", index).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert [float(c) for c in cells[4:6]] == [score("chain", "dwa", 1, t, FARM.names) for t in FARM.names]
    ens_row = re.search(r"<tr><td>ens</td>(.*?)</tr>", index).group(1)
    assert re.findall(r"<td>(.*?)</td>", ens_row)[-3:] == [".6000", ".4000", ".5000"]
    assert "type_uar" not in index and "culture" not in index
