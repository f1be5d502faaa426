"""`avb probe`: on a cache written with plain h5py in which one known layer carries the signal, the probe names
that layer for every task (A-VB's four, and a corpus of its own with a 3-class and a 2-column [1, 9] task);
ridge's closed-form GCV equals brute-force GCV over sklearn Ridge fits; the logistic probe equals sklearn's
LogisticRegression on the same objective; `avb report` draws the heatmap."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from plain_cache import write_plain_h5
from sklearn.linear_model import LogisticRegression, Ridge

from extract.app.cli import main as avb
from heads.analysis.probe import (
    RIDGE_GRID,
    ProbeConfig,
    fit_logistic,
    logistic_predict,
    probe_layer,
)
from heads.metrics import ccc_per_column
from heads.tasks import AVB, Task, TaskSet

TASKS = AVB
DIMS = {"cnn": 24, "hidden_0": 32, "hidden_1": 32, "hidden_2": 32, "hidden_3": 32, "hidden_4": 32}
SIGNAL_LAYER = "hidden_3"
SIZES = (400, 300, 40)
# A corpus of its own: a 3-class task and a 2-column regression task rated on [1, 9].
FARM = TaskSet((Task("call", "classification", ("Call",), ("bark", "meow", "moo")),
                Task("mood", "regression", ("Valence", "Arousal"), low=1.0, high=9.0)), name="farm")


def write_probe_cache(path: Path, seed: int = 0, tasks: TaskSet | None = None) -> Path:
    """A cache per cache/FORMAT.md, with nothing but h5py. Labels are functions of a latent z (8-d): a
    classification task's the arg-max of a projection, a regression task's a squashed projection scaled to
    its range; `hidden_3` is a random projection of z plus noise, `hidden_2` a weaker (noisier) one, the rest
    pure noise. Without `tasks`: A-VB's four and no `tasks` attribute (an old cache)."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    splits = np.array(["Train"] * SIZES[0] + ["Val"] * SIZES[1] + ["Test"] * SIZES[2])
    z = rng.normal(size=(n, 8))
    labels = {}
    for task in tasks or AVB:
        if task.is_classification:
            labels[task.name] = np.argmax(z @ rng.normal(size=(8, len(task.classes))), 1).astype(np.float32)[:, None]
        else:
            unit = 1 / (1 + np.exp(-(z @ rng.normal(size=(8, len(task.columns)))) * 0.8))
            labels[task.name] = (task.low + (task.high - task.low) * unit).astype(np.float32)
    for values in labels.values():
        values[splits == "Test"] = np.nan
    pooled = {}
    for layer, dim in DIMS.items():
        noise = rng.normal(size=(n, dim))
        strength = {SIGNAL_LAYER: 1.0, "hidden_2": 0.25}.get(layer, 0.0)
        x = strength * (z @ rng.normal(size=(8, dim))) + (0.3 if layer == SIGNAL_LAYER else 1.0) * noise
        pooled[layer] = 3.0 * x + 5.0                              # not standardised
    return write_plain_h5(path, [f"{i:05d}" for i in range(n)], splits, labels, pooled, model_type="hand-made",
                          tasks=tasks)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    cache = write_probe_cache(root / "plain.h5")
    result = CliRunner().invoke(avb, ["probe", "--cache", str(cache), "--out", str(root / "probe"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return cache, root / "probe", result.output


def test_the_probe_names_the_layer_that_carries_the_signal_for_every_task(probed):
    _, out, printed = probed
    data = json.loads((out / "probe.json").read_text())
    assert data["layers"] == list(DIMS) and (data["n_train"], data["n_val"]) == SIZES[:2]
    for task in TASKS.names:
        assert data["best"][task]["layer"] == SIGNAL_LAYER, task
        scores = {layer: data["scores"][layer][task][TASKS[task].metric] for layer in DIMS}
        noise = [scores[layer] for layer in DIMS if layer not in (SIGNAL_LAYER, "hidden_2")]
        assert scores[SIGNAL_LAYER] > scores["hidden_2"] > max(noise), (task, scores)   # signal strength ordered
        assert scores[SIGNAL_LAYER] > (0.6 if task == "type" else 0.8), (task, scores)
        assert max(noise) < (0.3 if task == "type" else 0.15), (task, scores)          # chance: .125 / 0
        assert f"best layer for {TASKS[task].title}: {SIGNAL_LAYER} " in printed
    assert data["backbone"]["model_type"] == "hand-made"


def test_probe_csv_has_a_row_per_layer_task_and_metric_and_agrees_with_the_json(probed):
    _, out, _ = probed
    with open(out / "probe.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["layer", "task", "metric", "val_score"]
    assert len(rows) == len(DIMS) * (1 + 2 * 3)      # type: uar; two/high/culture: ccc and pearson
    assert {(r["task"], r["metric"]) for r in rows} == {("type", "uar"), ("two", "ccc"), ("two", "pearson"),
                                                       ("high", "ccc"), ("high", "pearson"), ("culture", "ccc"),
                                                       ("culture", "pearson")}
    data = json.loads((out / "probe.json").read_text())
    for r in rows:
        assert float(r["val_score"]) == data["scores"][r["layer"]][r["task"]][r["metric"]]
    md = (out / "probe.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith(f"| {SIGNAL_LAYER} |"))
    assert line.count("**") == 8                       # the best of all four columns, in bold
    assert "Best layer per task: A-VB-TYPE hidden_3" in md


def standardised(cache: Path, layer: str):
    from cache.reader import load_cache

    data = load_cache(cache, layers=[layer], splits=["Train", "Val"])
    tr, va = data.indices("Train"), data.indices("Val")
    x = data.pooled[layer].astype(np.float64)
    mean, std = x[tr].mean(0), x[tr].std(0)
    labels = {t: np.asarray(v, np.float64) for t, v in data.labels.items()}
    return (x[tr] - mean) / std, (x[va] - mean) / std, {t: v[tr] for t, v in labels.items()}, \
        {t: v[va] for t, v in labels.items()}


def test_ridge_strength_equals_brute_force_gcv_over_sklearn_fits(probed):
    cache, out, _ = probed
    data = json.loads((out / "probe.json").read_text())
    for layer in ("hidden_2", SIGNAL_LAYER):
        xt, xv, yt, yv = standardised(cache, layer)
        n, d = xt.shape
        xc = xt - xt.mean(0)
        mean_eig = np.trace(xc.T @ xc) / d
        lambdas = [rel * mean_eig for rel in RIDGE_GRID]
        dfs = [np.trace(xc @ np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T)) + 1 for lam in lambdas]
        for task in ("two", "culture"):
            gcv = []
            for lam, df in zip(lambdas, dfs):
                model = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(xt, yt[task])
                rss = ((yt[task] - model.predict(xt)) ** 2).sum()
                gcv.append(rss / n / (1 - df / n) ** 2)
            best = int(np.argmin(gcv))
            assert data["regularisation"][layer][task] == pytest.approx(lambdas[best], rel=1e-9)
            model = Ridge(alpha=lambdas[best], fit_intercept=True, solver="cholesky").fit(xt, yt[task])
            want = ccc_per_column(yv[task], model.predict(xv)).mean()
            assert data["scores"][layer][task]["ccc"] == pytest.approx(want, abs=1e-6), (layer, task)


def test_logistic_probe_equals_sklearn_on_the_same_objective():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6))
    y = np.argmax(x @ rng.normal(size=(6, 4)) + rng.normal(size=(300, 4)), 1)
    y[:12] = 3                                           # unbalanced classes: the balanced weights matter
    lam = 0.05
    w = fit_logistic(x, y, lam, 4, max_iter=500).numpy()
    ref = LogisticRegression(C=1 / (lam * len(y)), class_weight="balanced", tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w[:-1].T - w[:-1].T.mean(0), ref.coef_ - ref.coef_.mean(0), atol=2e-3)
    np.testing.assert_allclose(logistic_predict(x, fit_logistic(x, y, lam, 4, max_iter=500)), ref.predict_proba(x),
                               atol=2e-3)


def test_probe_layer_skips_unlabelled_rows_and_tasks_can_be_chosen():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 5))
    labels = {"two": 1 / (1 + np.exp(-x[:, :2])), "type": np.argmax(x[:, :3], 1)[:, None].astype(float)}
    labels["two"][:10] = np.nan
    out = probe_layer(x[:80], {k: v[:80] for k, v in labels.items()}, x[80:], {k: v[80:] for k, v in labels.items()},
                      [TASKS["two"], TASKS["type"]], ProbeConfig())
    assert sorted(out.scores) == ["two", "type"] and out.scores["two"]["ccc"] > 0.8
    assert out.scores["type"]["uar"] > 0.7


def test_probe_errors_are_one_line(probed, tmp_path):
    cache, _, _ = probed
    res = CliRunner().invoke(avb, ["probe", "--cache", str(cache), "--out", str(tmp_path / "p"),
                                   "--layers", "hidden_9"])
    assert res.exit_code == 1 and res.output.strip() == (
        f"Error: {cache} has no layer 'hidden_9'; it holds {', '.join(DIMS)}")
    res = CliRunner().invoke(avb, ["probe", "--cache", str(cache), "--out", str(tmp_path / "p"), "--tasks", "two,mood"])
    assert res.exit_code == 1
    assert res.output.strip() == "Error: unknown task 'mood'; expected some of type, two, high, culture"
    res = CliRunner().invoke(avb, ["probe", "--cache", str(tmp_path / "none.h5"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and res.output.strip() == f"Error: {tmp_path / 'none.h5'}: no such file"


def test_report_draws_the_probe_heatmap(probed, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, _ = probed
    result = CliRunner().invoke(avb, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    png = tmp_path / "report" / f"probe_{out.name}.png"
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 400 and height > 200
    index = (tmp_path / "report" / "index.html").read_text()
    assert f"probe_{out.name}.png" in index and "Linear probes" in index and "<b>" in index
    assert "probe.csv" in index


def test_a_corpus_of_its_own_is_probed_task_by_task_and_reported(tmp_path):
    """A cache whose `tasks` attribute names a 3-class task and a 2-column regression task on [1, 9]: both are
    probed (logistic / ridge), the signal layer wins both, and the outputs and the report name those tasks."""
    cache = write_probe_cache(tmp_path / "farm.h5", seed=1, tasks=FARM)
    out = tmp_path / "probe"
    result = CliRunner().invoke(avb, ["probe", "--cache", str(cache), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "probe.json").read_text())
    assert data["tasks"] == ["call", "mood"] and data["config"]["tasks"] == ["call", "mood"]
    assert TaskSet.from_json(data["task_set"]) == FARM
    for task in FARM:
        assert data["best"][task.name]["layer"] == SIGNAL_LAYER, task.name
        assert data["best"][task.name]["metric"] == task.metric
        scores = {layer: data["scores"][layer][task.name][task.metric] for layer in DIMS}
        noise = [scores[layer] for layer in DIMS if layer not in (SIGNAL_LAYER, "hidden_2")]
        assert scores[SIGNAL_LAYER] > scores["hidden_2"] > max(noise), (task.name, scores)
        assert scores[SIGNAL_LAYER] > 0.8, (task.name, scores)
        assert max(noise) < (0.5 if task.is_classification else 0.15), (task.name, scores)   # chance: 1/3 / 0
        assert f"best layer for {task.title}: {SIGNAL_LAYER} " in result.output
    # the ridge strength is chosen on the labels' own scale (here [1, 9]) and the logistic C from its grid
    assert data["regularisation"][SIGNAL_LAYER]["call"] in ProbeConfig().logistic_c_grid
    with open(out / "probe.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(DIMS) * 3
    assert {(r["task"], r["metric"]) for r in rows} == {("call", "uar"), ("mood", "ccc"), ("mood", "pearson")}
    md = (out / "probe.md").read_text()
    assert md.startswith("| layer | call UAR | mood CCC |\n")
    assert f"Best layer per task: call {SIGNAL_LAYER}" in md and f"mood {SIGNAL_LAYER}" in md
    assert "call: multinomial logistic regression" in md and "mood: ridge regression" in md
    assert "TYPE" not in md and "CULTURE" not in md
    line = next(x for x in md.splitlines() if x.startswith(f"| {SIGNAL_LAYER} |"))
    assert line.count("**") == 4

    # One task, named in any case; a name the cache does not know is refused with the cache's names.
    one = CliRunner().invoke(avb, ["probe", "--cache", str(cache), "--out", str(tmp_path / "one"), "--no-progress",
                                   "--tasks", "MOOD", "--layers", f"cnn,{SIGNAL_LAYER}"])
    assert one.exit_code == 0, one.output
    assert json.loads((tmp_path / "one" / "probe.json").read_text())["tasks"] == ["mood"]
    bad = CliRunner().invoke(avb, ["probe", "--cache", str(cache), "--out", str(tmp_path / "p"), "--tasks", "type"])
    assert bad.exit_code == 1
    assert bad.output.strip() == "Error: unknown task 'type'; expected some of call, mood"

    pytest.importorskip("matplotlib")
    report = CliRunner().invoke(avb, ["report", str(out), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    png = (tmp_path / "report" / f"probe_{out.name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    index = (tmp_path / "report" / "index.html").read_text()
    assert "<title>farm results</title>" in index and "<th>call UAR</th>" in index
