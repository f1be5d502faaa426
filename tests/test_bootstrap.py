"""Bootstrap intervals: the vectorised resampling equals a slow loop over resamples scored with heads.metrics,
perfect predictions give zero-width intervals at 1, and `avb score --ci` reports them beside every score."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import val_labels

from extract.app.cli import main
from extract.synth import synthesize_corpus
from heads.analysis import bootstrap as boot
from heads.analysis.bootstrap import (
    BootstrapConfig,
    BootstrapError,
    resample_indices,
    score_distributions,
    score_intervals,
    win_fraction,
)
from heads.metrics import score_all
from heads.submission import PROBS_FILE, write_predictions
from heads.tasks import AVB


def random_task_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = {"type": rng.integers(0, 8, (n, 1)).astype(np.float64), "two": rng.random((n, 2)),
              "high": rng.random((n, 10)), "culture": rng.random((n, 40))}
    labels["two"][3] = np.nan          # an unlabelled clip: it must weigh nothing, as score_all drops it
    preds = {"type": rng.random((n, 8)), "two": np.nan_to_num(labels["two"], nan=0.5) * 0.6 + 0.4 * rng.random((n, 2)),
             "high": labels["high"] * 0.3 + rng.random((n, 10)), "culture": labels["culture"] + rng.random((n, 40))}
    return labels, preds


def slow_distribution(labels, preds, n_boot, seed):
    """The obvious way: draw each resample, index every array with it, score it with heads.metrics."""
    n = len(labels["type"])
    out = {}
    for b in range(n_boot):
        idx = resample_indices(n, b, seed)
        scores = score_all(AVB, {k: v[idx] for k, v in labels.items()}, {k: v[idx] for k, v in preds.items()})
        for key, value in scores.items():
            out.setdefault(key, []).append(value)
    return {k: np.array(v) for k, v in out.items()}


def test_vectorised_bootstrap_equals_a_slow_loop_over_resamples(monkeypatch):
    labels, preds = random_task_data(150, seed=1)
    monkeypatch.setattr(boot, "BLOCK_CELLS", 150 * 7)   # several blocks, the last one partial
    config = BootstrapConfig(level=0.9, n_boot=60, seed=7)
    fast = score_distributions(AVB, labels, [preds], config)[0]
    slow = slow_distribution(labels, preds, 60, seed=7)
    assert sorted(fast) == sorted(slow)
    for key in slow:
        np.testing.assert_allclose(fast[key], slow[key], rtol=0, atol=1e-10, err_msg=key)
        assert score_intervals(AVB, labels, preds, config)[key] == pytest.approx(
            list(np.quantile(slow[key], [0.05, 0.95])), abs=1e-10)


def test_group_bootstrap_equals_a_slow_loop_that_draws_whole_speakers(monkeypatch):
    """Resampling groups: resample b draws G group indices and takes every clip of each drawn group."""
    labels, preds = random_task_data(90, seed=3)
    codes = np.random.default_rng(0).integers(0, 12, 90)        # 12 speakers, unevenly sized, interleaved
    monkeypatch.setattr(boot, "BLOCK_CELLS", 90 * 5)
    config = BootstrapConfig(n_boot=40, seed=2)
    fast = score_distributions(AVB, labels, [preds], config, groups=codes)[0]
    slow: dict[str, list[float]] = {}
    for b in range(40):
        idx = np.concatenate([np.flatnonzero(codes == g) for g in resample_indices(12, b, seed=2)])
        for key, value in score_all(AVB, {k: v[idx] for k, v in labels.items()},
                                    {k: v[idx] for k, v in preds.items()}).items():
            slow.setdefault(key, []).append(value)
    assert sorted(fast) == sorted(slow)
    for key, values in slow.items():
        np.testing.assert_allclose(fast[key], values, rtol=0, atol=1e-10, err_msg=key)


def test_resamples_are_fixed_by_seed_and_index_and_shared_by_all_tasks():
    a = resample_indices(50, 3, seed=2)
    assert np.array_equal(a, np.random.default_rng([2, 3]).integers(0, 50, 50))
    assert not np.array_equal(a, resample_indices(50, 4, seed=2))
    counts = boot.resample_counts(50, 2, 5, seed=2)
    assert counts.shape == (3, 50) and (counts.sum(1) == 50).all()
    np.testing.assert_array_equal(counts[1], np.bincount(a, minlength=50))


def test_perfect_predictions_give_an_interval_of_zero_width_at_one():
    labels, _ = random_task_data(120, seed=3)
    perfect = {"type": labels["type"][:, 0].astype(int), "two": np.nan_to_num(labels["two"], nan=0.5),
               "high": labels["high"], "culture": labels["culture"]}
    cis = score_intervals(AVB, labels, perfect, BootstrapConfig(n_boot=200))
    assert set(cis) == {"type_uar", "type_accuracy", "type_f1", "two_ccc", "two_pearson", "high_ccc",
                        "high_pearson", "culture_ccc", "culture_pearson", "mean"}
    for key, (low, high) in cis.items():
        assert low == pytest.approx(1.0, abs=1e-9) and high == pytest.approx(1.0, abs=1e-9), key


def test_a_systems_distribution_does_not_depend_on_the_systems_scored_beside_it(monkeypatch):
    """A grown grid must leave its finished runs' intervals byte-equal: each system's resampled scores are the
    same arrays whether it is scored alone, first or last among others, in one block or several."""
    labels, preds = random_task_data(180, seed=6)
    others = [{**preds, "high": preds["high"] * (1 + k / 10), "two": preds["two"] + k / 7} for k in range(1, 6)]
    config = BootstrapConfig(n_boot=90, seed=3)
    alone = score_distributions(AVB, labels, [preds], config)[0]
    for systems, at in (([preds, *others], 0), ([*others, preds], 5), ([others[0], preds, others[1]], 1)):
        beside = score_distributions(AVB, labels, systems, config)[at]
        assert sorted(beside) == sorted(alone)
        for key in alone:
            assert beside[key].tobytes() == alone[key].tobytes(), key


def test_paired_win_fraction_uses_the_same_resamples_for_both_systems():
    labels, preds = random_task_data(200, seed=4)
    better = {**preds, "high": labels["high"] * 0.8 + 0.2 * preds["high"]}
    config = BootstrapConfig(n_boot=100, seed=5)
    worse_d, better_d = score_distributions(AVB, labels, [preds, better], config)
    slow_w, slow_b = slow_distribution(labels, preds, 100, 5), slow_distribution(labels, better, 100, 5)
    for key in slow_w:
        np.testing.assert_allclose(worse_d[key], slow_w[key], rtol=0, atol=1e-10, err_msg=key)
        np.testing.assert_allclose(better_d[key], slow_b[key], rtol=0, atol=1e-10, err_msg=key)
    assert win_fraction(worse_d["high_ccc"], better_d["high_ccc"]) == 0.0       # clearly worse on every redraw
    assert win_fraction(better_d["high_ccc"], worse_d["high_ccc"]) == 1.0
    # systems equal in TYPE (same predictions) tie on every resample: half a win each
    assert win_fraction(better_d["type_uar"], worse_d["type_uar"]) == 0.5
    mixed = win_fraction(worse_d["mean"], better_d["mean"])
    assert mixed == pytest.approx(float(np.mean(slow_w["mean"] > slow_b["mean"])))
    assert win_fraction(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0, 2.0])) == 0.625  # by hand
    with pytest.raises(BootstrapError, match="equal resample counts"):
        win_fraction(worse_d["mean"][:5], better_d["mean"])


def test_bad_settings_are_refused():
    with pytest.raises(BootstrapError, match="between 0 and 1"):
        BootstrapConfig(level=95)
    with pytest.raises(BootstrapError, match="must be >= 1"):
        BootstrapConfig(n_boot=0)


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("boot") / "corpus", clips=80, seed=6, max_seconds=0.8,
                             progress=False)


def test_avb_score_ci_adds_an_interval_beside_every_score(corpus_root, tmp_path):
    rng = np.random.default_rng(0)
    truth, preds = {}, {}
    for name, task in zip(AVB.names, AVB):
        ids, truth[name] = val_labels(corpus_root, task)
        preds[name] = (rng.random((len(ids), 8)) if task.is_classification
                       else np.clip(truth[name] * 0.7 + rng.random(truth[name].shape) * 0.3, 0, 1))
    files = [str(p) for p in write_predictions(tmp_path, AVB, ids, preds, team="t", number=1)
             if p.name != PROBS_FILE]
    args = ["score", "--corpus", str(corpus_root), "--json", "--seed", "3", "--n-boot", "300"]
    result = CliRunner().invoke(main, args + ["--ci", "0.95", *files])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert list(got)[:8] == ["type_uar", "type_uar_ci", "type_accuracy", "type_accuracy_ci", "type_f1", "type_f1_ci",
                             "two_ccc", "two_ccc_ci"] and len(got) == 18
    order = np.argsort(ids)                            # the corpus keeps a split's clips sorted by id
    labels = {"type": truth["type"][order, None].astype(float),
              **{k: truth[k][order] for k in ("two", "high", "culture")}}
    tasks_preds = {"type": preds["type"][order].argmax(1), **{k: preds[k][order] for k in ("two", "high", "culture")}}
    slow = slow_distribution(labels, tasks_preds, 300, seed=3)
    for key in ("type_uar", "two_ccc", "high_pearson", "culture_ccc"):
        low, high = got[f"{key}_ci"]
        assert [low, high] == pytest.approx(list(np.quantile(slow[key], [0.025, 0.975])), abs=1e-6), key
        assert low < got[key] < high
    narrow = json.loads(CliRunner().invoke(main, args + ["--ci", "0.5", *files]).output)
    assert narrow["two_ccc_ci"][1] - narrow["two_ccc_ci"][0] < got["two_ccc_ci"][1] - got["two_ccc_ci"][0]
    table = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), "--ci", "0.9", files[1]])
    assert "90% CI" in table.output and table.output.count("[") == 2   # Two: CCC and Pearson rows
    bad = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), "--ci", "95", files[1]])
    assert bad.exit_code == 2 and "--ci" in bad.output
