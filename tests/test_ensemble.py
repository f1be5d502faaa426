"""`avb ensemble` on crafted run dirs whose scores are known: selection, averaging, files and refusals.

References are computed here independently of heads.metrics: CCC from its textbook formula, Pearson with scipy,
UAR with sklearn's macro recall (every class occurs in the crafted Val labels, where the two agree).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import pearsonr
from sklearn.metrics import recall_score

from cache.writer import CacheWriter
from heads.analysis.bootstrap import BootstrapConfig, score_intervals
from heads.analysis.ensemble import ensemble_command, select_greedy
from heads.metrics import score_all
from heads.runs import RUN_FORMAT
from heads.submission import (
    read_class_probs,
    read_submission,
    write_predictions,
)
from heads.tasks import AVB, TYPE_CLASSES

N_TRAIN, N_VAL, N_TEST = 4, 48, 12
BACKBONE = {"name": "tiny-random-wav2vec2", "hidden_size": 4}
DIMS = {"two": 2, "high": 10, "culture": 40}


# ------------------------------------------------------------------------------------------------ fixtures

def ref_ccc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over columns of 2 cov / (var_y + var_p + (mean_y - mean_p)^2), population moments."""
    out = []
    for j in range(y.shape[1]):
        a, b = y[:, j], p[:, j]
        cov = np.mean((a - a.mean()) * (b - b.mean()))
        out.append(2 * cov / (a.var() + b.var() + (a.mean() - b.mean()) ** 2))
    return float(np.mean(out))


def ref_pearson(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean([pearsonr(y[:, j], p[:, j])[0] for j in range(y.shape[1])]))


def ref_uar(y: np.ndarray, probs: np.ndarray) -> float:
    return float(recall_score(y.ravel().astype(int), probs.argmax(1), average="macro"))


class World:
    """A cache plus helpers to write run dirs whose Val predictions are noisy copies of the labels."""

    def __init__(self, root: Path, backbone: dict | None = None) -> None:
        rng = np.random.default_rng(0)
        self.root = root
        # Ids deliberately not in split order or sorted order inside the cache: matching must go by id.
        ids = [f"{i:05d}" for i in rng.permutation(N_TRAIN + N_VAL + N_TEST) + 1]
        splits = ["Train"] * N_TRAIN + ["Val"] * N_VAL + ["Test"] * N_TEST
        n = len(ids)
        labels = {"type": np.full((n, 1), np.nan)}
        labels["type"][: N_TRAIN + N_VAL, 0] = np.arange(N_TRAIN + N_VAL) % 8
        for name, k in DIMS.items():
            # float32-representable values: the cache stores labels as float32, so references match exactly.
            labels[name] = rng.random((n, k)).astype(np.float32).astype(np.float64)
            labels[name][N_TRAIN + N_VAL:] = np.nan
        self.cache = root / "cache.h5"
        with CacheWriter(self.cache, layer_dims={"cnn": 4},
                         label_columns={name: list(AVB[name].columns) for name in AVB.names},
                         label_classes={"type": list(TYPE_CLASSES)},
                         attrs={"backbone": backbone or BACKBONE, "sample_rate": 16000, "clip_seconds": 2.5}) as w:
            w.append(ids, splits, labels, np.full(n, 5), {"cnn": rng.random((n, 4))})
        val = slice(N_TRAIN, N_TRAIN + N_VAL)
        self.val_ids = ids[val]
        self.test_ids = ids[N_TRAIN + N_VAL:]
        self.val_labels = {name: labels[name][val] for name in AVB.names}

    def preds(self, seed: int, noise: dict[str, float], n: int = N_VAL) -> dict[str, np.ndarray]:
        """Labels plus Gaussian noise of the given size per task; TYPE as softmax probabilities."""
        rng = np.random.default_rng(seed)
        out = {}
        logits = np.eye(8)[self.val_labels["type"][:, 0].astype(int)] * 2.0 if n == N_VAL else np.zeros((n, 8))
        logits = logits + noise["type"] * rng.standard_normal((n, 8))
        e = np.exp(logits - logits.max(1, keepdims=True))
        out["type"] = e / e.sum(1, keepdims=True)
        for name, k in DIMS.items():
            base = self.val_labels[name] if n == N_VAL else np.full((n, k), 0.5)
            out[name] = base + noise[name] * rng.standard_normal((n, k))
        return out

    def run(self, name: str, seed: int, noise: dict[str, float], *, parent: Path | None = None,
            arch: str = "vanilla", weighting: str = "dwa", backbone: dict | None = None,
            val_ids: list[str] | None = None, complete: bool = True) -> tuple[Path, dict, dict]:
        path = (parent or self.root) / name
        val = self.preds(seed, noise)
        test = self.preds(seed + 1000, noise, n=N_TEST)
        ids = self.val_ids if val_ids is None else val_ids
        keep = [self.val_ids.index(i) for i in ids]
        val_written = {k: v[keep] for k, v in val.items()}
        for split, split_ids, preds in (("val", ids, val_written), ("test", self.test_ids, test)):
            folder = path / "predictions" / split
            write_predictions(folder, AVB, split_ids, preds, team="avb", number=1)  # with type_probs.csv
        config = {"run_format": RUN_FORMAT, "arch": arch, "weighting": weighting, "seed": seed,
                  "cache": str(self.cache),
                  "cache_attrs": {"backbone": backbone or BACKBONE, "layers": ["cnn"]}}
        (path / "config.json").write_text(json.dumps(config))
        if complete:
            metrics = score_all(AVB, self.val_labels, val) if val_ids is None else {"mean": 0.0}
            (path / "metrics.json").write_text(json.dumps({**metrics, "best_epoch": 1, "history": []}))
        return path, val, test


GOOD, BAD = 0.05, 0.6


def noise(**good: bool) -> dict[str, float]:
    return {name: GOOD if good.get(name) else BAD for name in AVB.names}


@pytest.fixture()
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def invoke(*args: str):
    return CliRunner().invoke(ensemble_command, [str(a) for a in args], catch_exceptions=False)


def read_val(out: Path, team: str = "avb", number: int = 1) -> dict[str, tuple[list[str], np.ndarray]]:
    files = {}
    for name in AVB.names:
        folder = out / "predictions" / "val"
        _, ids, values = read_submission(folder / f"A-VB-{AVB[name].file_stem}_{team}_{number}.csv", AVB)
        files[name] = (ids, values)
    return files


def by_id(ids: list[str], values: np.ndarray, order: list[str]) -> np.ndarray:
    pos = {i: k for k, i in enumerate(ids)}
    return values[[pos[i] for i in order]]


# ---------------------------------------------------------------------------------------------------- tests

def test_combined_takes_each_task_from_its_best_run_and_scores_match_independent_references(world, tmp_path):
    a, va, _ = world.run("A", 1, noise(type=True))
    b, vb, tb = world.run("B", 2, noise(two=True, high=True))
    c, vc, _ = world.run("C", 3, noise(culture=True))
    out = tmp_path / "ens"
    result = invoke(a, b, c, "--out", out)
    assert result.exit_code == 0, result.output

    members = json.loads((out / "members.json").read_text())
    chosen = {name: [(Path(m["run"]).name, m["weight"]) for m in members["tasks"][name]] for name in AVB.names}
    assert chosen == {"type": [("A", 1.0)], "two": [("B", 1.0)], "high": [("B", 1.0)], "culture": [("C", 1.0)]}

    metrics = json.loads((out / "metrics.json").read_text())
    y = world.val_labels
    assert metrics["type_uar"] == pytest.approx(ref_uar(y["type"], va["type"]), abs=1e-12)
    assert metrics["two_ccc"] == pytest.approx(ref_ccc(y["two"], vb["two"]), abs=1e-7)
    assert metrics["high_pearson"] == pytest.approx(ref_pearson(y["high"], vb["high"]), abs=1e-7)
    assert metrics["culture_ccc"] == pytest.approx(ref_ccc(y["culture"], vc["culture"]), abs=1e-7)
    headline = [metrics[k] for k in ("type_uar", "two_ccc", "high_ccc", "culture_ccc")]
    assert metrics["mean"] == pytest.approx(np.mean(headline), abs=1e-12)
    # Per task never below any single run (it is the best run's predictions for that task).
    for preds in (va, vb, vc):
        single = score_all(AVB, y, preds)
        for key in ("type_uar", "two_ccc", "high_ccc", "culture_ccc"):
            assert metrics[key] >= single[key] - 1e-7
    # The printed table lists the members and the ensemble row.
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "type_uar", "two_ccc", "high_ccc", "culture_ccc", "mean"]
    assert [line.split()[0] for line in lines[1:5]] == ["A", "B", "C", "ensemble"]
    assert float(lines[4].split()[2]) == pytest.approx(metrics["two_ccc"], abs=1e-4)


def test_test_submission_files_have_official_headers_bracketed_sorted_ids_and_the_chosen_runs_values(world, tmp_path):
    a, _, ta = world.run("A", 1, noise(type=True))
    b, _, tb = world.run("B", 2, noise(two=True, high=True, culture=True))
    out = tmp_path / "ens"
    assert invoke(a, b, "--out", out, "--team", "myteam", "--submission", "3").exit_code == 0

    expected_headers = {
        "Type": b"File_ID,Voc_Type\n",
        "Two": b"File_ID,Valence,Arousal\n",
        "High": b"File_ID,Awe,Excitement,Amusement,Awkwardness,Fear,Horror,Distress,Triumph,Sadness,Surprise\n",
    }
    for stem, header in expected_headers.items():
        data = (out / f"A-VB-{stem}_myteam_3.csv").read_bytes()
        assert data.startswith(header)
    culture = (out / "A-VB-Culture_myteam_3.csv").read_text().splitlines()[0].split(",")
    assert culture[:3] == ["File_ID", "China_Awe", "China_Excitement"]
    assert culture[9:11] == ["China_Sadness", "United States_Awe"]
    assert culture[-4:] == ["China_Surprise", "United States_Surprise", "South Africa_Surprise", "Venezuela_Surprise"]
    assert len(culture) == 41

    for stem in ("Type", "Two", "High", "Culture"):
        rows = (out / f"A-VB-{stem}_myteam_3.csv").read_text().splitlines()[1:]
        ids = [r.split(",")[0] for r in rows]
        assert ids == [f"[{i}]" for i in sorted(world.test_ids)]
    # Test values are the chosen runs' Test predictions, matched by id.
    _, ids, two = read_submission(out / "A-VB-Two_myteam_3.csv", AVB)
    np.testing.assert_allclose(two, by_id(world.test_ids, tb["two"], ids), rtol=1e-8)
    _, ids, types = read_submission(out / "A-VB-Type_myteam_3.csv", AVB)
    np.testing.assert_array_equal(types, by_id(world.test_ids, ta["type"], ids).argmax(1))
    prob_ids, probs = read_class_probs(out / "predictions" / "test" / "type_probs.csv", AVB, AVB["type"])
    np.testing.assert_allclose(probs, by_id(world.test_ids, ta["type"], prob_ids), rtol=1e-8)
    assert not list(out.glob("A-VB-*_avb_1.csv"))


def test_rescoring_the_written_val_predictions_reproduces_metrics_json(world, tmp_path):
    runs = [world.run(n, s, noise(**{t: True})) [0] for n, s, t in (("A", 1, "type"), ("B", 2, "high"))]
    for strategy in ("combined", "mean", "greedy"):
        out = tmp_path / strategy
        assert invoke(*runs, "--out", out, "--strategy", strategy).exit_code == 0
        metrics = json.loads((out / "metrics.json").read_text())
        preds = {name: by_id(ids, values, world.val_ids) for name, (ids, values) in read_val(out).items()}
        rescored = score_all(AVB, world.val_labels, preds)
        assert set(metrics) == set(rescored) | {f"{key}_ci" for key in rescored}
        # resamples index the clips in id order (as `avb score --ci` does), so the same files give the same CIs
        order = np.argsort(world.val_ids)
        cis = score_intervals(AVB, {k: v[order] for k, v in world.val_labels.items()},
                              {k: v[order] for k, v in preds.items()}, BootstrapConfig(level=0.95, n_boot=1000))
        for key, value in rescored.items():
            assert metrics[key] == pytest.approx(value, abs=1e-12), (strategy, key)
            assert metrics[f"{key}_ci"] == pytest.approx(cis[key], abs=1e-12), (strategy, key)
            assert metrics[f"{key}_ci"][0] <= value <= metrics[f"{key}_ci"][1]
    out = tmp_path / "no-ci"
    assert invoke(*runs, "--out", out, "--ci", "0").exit_code == 0
    assert not [k for k in json.loads((out / "metrics.json").read_text()) if k.endswith("_ci")]


def test_mean_of_identical_runs_equals_the_run(world, tmp_path):
    a, va, _ = world.run("A", 1, noise(type=True, two=True))
    shutil.copytree(a, tmp_path / "A2")
    out = tmp_path / "ens"
    assert invoke(a, tmp_path / "A2", "--out", out, "--strategy", "mean", "--top-k", "2").exit_code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    single = score_all(AVB, world.val_labels, va)
    for key, value in single.items():
        assert metrics[key] == pytest.approx(value, abs=1e-7), key
    written = read_val(out)
    for name in ("two", "high", "culture"):
        ids, values = written[name]
        np.testing.assert_allclose(values, by_id(world.val_ids, va[name], ids), rtol=1e-8)


def test_mean_averages_the_top_k_runs_by_val_mean_and_type_by_averaged_probabilities(world, tmp_path):
    a, va, _ = world.run("A", 1, noise(type=True, two=True, high=True, culture=True))   # best
    b, vb, _ = world.run("B", 2, noise(two=True, high=True, culture=True))              # second
    c, vc, _ = world.run("C", 3, noise())                                               # worst
    out = tmp_path / "ens"
    assert invoke(c, b, a, "--out", out, "--strategy", "mean", "--top-k", "2").exit_code == 0
    members = json.loads((out / "members.json").read_text())
    for name in AVB.names:
        assert sorted((Path(m["run"]).name, m["weight"]) for m in members["tasks"][name]) == [("A", 0.5), ("B", 0.5)]
    metrics = json.loads((out / "metrics.json").read_text())
    y = world.val_labels
    avg = {name: (va[name] + vb[name]) / 2 for name in AVB.names}
    assert metrics["type_uar"] == pytest.approx(ref_uar(y["type"], avg["type"]), abs=1e-12)
    for name in DIMS:
        assert metrics[f"{name}_ccc"] == pytest.approx(ref_ccc(y[name], avg[name]), abs=1e-7)
        assert metrics[f"{name}_pearson"] == pytest.approx(ref_pearson(y[name], avg[name]), abs=1e-7)
    ids, types = read_val(out)["type"]
    np.testing.assert_array_equal(types, by_id(world.val_ids, avg["type"], ids).argmax(1))


def test_greedy_is_never_worse_than_the_best_member_and_mixes_runs_when_that_helps(world, tmp_path):
    # Two runs with equal, independent noise: their average has half the noise variance, so greedy takes both.
    a, va, _ = world.run("A", 1, noise(type=True))
    b, vb, _ = world.run("B", 2, noise())
    c, vc, _ = world.run("C", 3, noise())
    out = tmp_path / "ens"
    assert invoke(a, b, c, "--out", out, "--strategy", "greedy").exit_code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    members = json.loads((out / "members.json").read_text())
    singles = [score_all(AVB, world.val_labels, p) for p in (va, vb, vc)]
    for name in AVB.names:
        key = f"{name}_uar" if name == "type" else f"{name}_ccc"
        assert metrics[key] >= max(s[key] for s in singles) - 1e-7
        assert sum(m["weight"] for m in members["tasks"][name]) == pytest.approx(1.0)
    high = members["tasks"]["high"]
    assert len(high) >= 2
    assert metrics["high_ccc"] > max(s["high_ccc"] for s in singles) + 0.01
    # The written High predictions are the weighted average of the members' predictions.
    preds = {"A": va, "B": vb, "C": vc}
    blend = sum(m["weight"] * preds[Path(m["run"]).name]["high"] for m in high)
    assert metrics["high_ccc"] == pytest.approx(ref_ccc(world.val_labels["high"], blend), abs=1e-7)


def test_greedy_selection_with_replacement_on_hand_worked_values():
    # Labels 0..3; run 0 = labels + (1,-1,1,-1)*e, run 1 = labels - (1,-1,1,-1)*e. Either alone is imperfect,
    # their equal mix is exact, so greedy picks one, then the other, then stops (nothing beats CCC = 1).
    y = np.arange(4.0)[:, None] * np.ones((1, 2))
    e = np.array([1, -1, 1, -1.0])[:, None] * 0.5
    labels = {"type": np.array([[0], [1], [0], [1.0]]), "two": y, "high": np.tile(y[:, :1], 10),
              "culture": np.tile(y[:, :1], 40)}
    probs0 = np.eye(8)[[0, 1, 0, 0]]
    probs1 = np.eye(8)[[0, 1, 1, 1]]
    run0 = {"type": probs0, "two": y + e, "high": labels["high"] + e, "culture": labels["culture"] + e}
    run1 = {"type": probs1, "two": y - e, "high": labels["high"] - e, "culture": labels["culture"] - e}
    members = select_greedy(AVB, [run0, run1], labels, rounds=20)
    assert members["two"] == [(0, 0.5), (1, 0.5)]
    assert members["culture"] == [(0, 0.5), (1, 0.5)]
    # TYPE: run 0 has UAR (2/2 + 1/2)/2 = .75, run 1 (1/2 + 2/2)/2 = .75; the tie goes to run 0, and the
    # 50/50 mix ties class 0 vs 1 on row 3 -> arg-max 0 = run 0 again, no strict improvement: stop.
    assert members["type"] == [(0, 1.0)]
    # One round = the best single run: var(y) = 1.25; run 0 has var 1, cov 1 -> CCC 2/2.25 = 8/9; run 1 has
    # var 2, cov 1.5 -> CCC 3/3.25 = 12/13, so run 1.
    assert select_greedy(AVB, [run0, run1], labels, rounds=1)["two"] == [(1, 1.0)]


def test_val_id_sets_that_differ_are_refused_naming_a_missing_id(world, tmp_path):
    a, _, _ = world.run("A", 1, noise())
    missing = sorted(world.val_ids)[3]
    b, _, _ = world.run("B", 2, noise(), val_ids=[i for i in world.val_ids if i != missing])
    result = CliRunner().invoke(ensemble_command, [str(a), str(b), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 1
    assert f"Error: runs {a} and {b} come from different caches (Val File_ID [{missing}] is in one and not " \
           "the other)" in result.output
    result = CliRunner().invoke(ensemble_command, [str(b), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 1
    assert f"Error: {b}: Val predictions lack File_ID [{missing}] of the cache's Val split (1 missing)" \
        in result.output
    assert not (tmp_path / "ens" / "metrics.json").exists()


def test_runs_from_caches_with_different_backbones_are_refused_naming_both(world, tmp_path):
    a, _, _ = world.run("A", 1, noise())
    b, _, _ = world.run("B", 2, noise(), backbone={"name": "other", "hidden_size": 4})
    result = CliRunner().invoke(ensemble_command, [str(a), str(b), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 1
    assert f"Error: runs {a} and {b} come from different caches (backbone " in result.output


def test_ablation_dir_means_its_complete_runs_and_incomplete_ones_are_skipped_with_a_warning(world, tmp_path):
    grid = tmp_path / "ablation"
    grid.mkdir()
    (grid / "config.json").write_text("{}")
    (grid / "results.csv").write_text("arch\n")
    a, _, _ = world.run("vanilla-dwa-s1", 1, noise(type=True), parent=grid)
    b, _, _ = world.run("chain-dwa-s2", 2, noise(two=True, high=True, culture=True), parent=grid, arch="chain")
    world.run("branch-dwa-s3", 3, noise(), parent=grid, arch="branch", complete=False)
    out = tmp_path / "ens"
    result = invoke(grid, "--out", out)
    assert result.exit_code == 0
    assert f"Warning: skipping incomplete run {grid / 'branch-dwa-s3'} (no metrics.json)" in result.stderr
    members = json.loads((out / "members.json").read_text())
    assert sorted(Path(r["run"]).name for r in members["runs"]) == ["chain-dwa-s2", "vanilla-dwa-s1"]
    assert Path(members["tasks"]["type"][0]["run"]).name == "vanilla-dwa-s1"


def test_cache_path_comes_from_config_and_cache_option_overrides_it(world, tmp_path):
    a, va, _ = world.run("A", 1, noise())
    config = json.loads((a / "config.json").read_text())
    config["cache"] = str(tmp_path / "moved.h5")
    (a / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(ensemble_command, [str(a), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'moved.h5'}: no such cache file (pass --cache to point at it)" in result.output
    assert invoke(a, "--out", tmp_path / "ens", "--cache", world.cache).exit_code == 0
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert metrics["two_ccc"] == pytest.approx(ref_ccc(world.val_labels["two"], va["two"]), abs=1e-7)


def test_a_cache_option_naming_a_cache_with_another_backbone_is_refused(world, tmp_path):
    a, _, _ = world.run("A", 1, noise())
    (tmp_path / "other").mkdir()
    other = World(tmp_path / "other", backbone={"name": "wavlm", "hidden_size": 4})
    result = CliRunner().invoke(ensemble_command, [str(a), "--out", str(tmp_path / "ens"), "--cache", str(other.cache)])
    assert result.exit_code == 1
    assert f"Error: run {a} was trained on a different cache than {other.cache} (backbone " in result.output


def test_every_recorded_cache_attribute_must_agree_and_the_difference_is_named(world, tmp_path):
    a, _, _ = world.run("A", 1, noise())
    b, _, _ = world.run("B", 2, noise())
    for run, clip in ((a, 2.5), (b, 3.0)):
        config = json.loads((run / "config.json").read_text())
        config["cache_attrs"]["clip_seconds"] = clip
        (run / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(ensemble_command, [str(a), str(b), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 1
    assert f"Error: runs {a} and {b} come from different caches (clip_seconds 2.5 vs 3.0)" in result.output
    c, _, _ = world.run("C", 3, noise(), backbone={**BACKBONE, "hidden_size": 8})
    result = CliRunner().invoke(ensemble_command, [str(a), str(c), "--out", str(tmp_path / "ens")])
    assert "come from different caches (backbone differs at backbone.hidden_size: 4 vs 8)" in result.output
