"""Metrics against independent references: sklearn recall, scipy Pearson and a float64 hand formula."""
import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score, recall_score

from heads.metrics import (
    ccc_per_column,
    macro_f1,
    pearson_per_column,
    score_all,
    score_task,
    uar,
)
from heads.tasks import AVB


def hand_ccc(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


def test_ccc_matches_hand_formula_per_column():
    rng = np.random.default_rng(0)
    y = rng.random((200, 5))
    p = 0.6 * y + 0.3 * rng.random((200, 5)) + 0.1
    got = ccc_per_column(y, p)
    want = [hand_ccc(y[:, j], p[:, j]) for j in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_ccc_worked_example_and_perfect_prediction():
    # x = (1,2,3), y = (2,3,4): var 2/3 each, cov 2/3, mean gap 1 -> 2*(2/3)/(4/3+1) = 4/7
    assert ccc_per_column([1, 2, 3], [2, 3, 4])[0] == pytest.approx(4 / 7, abs=1e-9)
    assert ccc_per_column([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])[0] == pytest.approx(1.0, abs=1e-9)


def test_ccc_and_pearson_are_finite_for_constant_inputs():
    assert np.isfinite(ccc_per_column(np.ones(10), np.ones(10))).all()
    assert ccc_per_column(np.ones(10), np.linspace(0, 1, 10))[0] == pytest.approx(0.0)
    assert pearson_per_column(np.ones(10), np.linspace(0, 1, 10))[0] == 0.0


def test_pearson_matches_scipy():
    rng = np.random.default_rng(1)
    y, p = rng.random((300, 3)), rng.random((300, 3))
    p[:, 1] += y[:, 1]
    want = [pearsonr(y[:, j], p[:, j])[0] for j in range(3)]
    np.testing.assert_allclose(pearson_per_column(y, p), want, atol=1e-6)


def test_uar_matches_sklearn_macro_recall_when_all_classes_occur():
    rng = np.random.default_rng(2)
    for _ in range(5):
        t = rng.integers(0, 8, 500)
        p = np.where(rng.random(500) < 0.4, t, rng.integers(0, 8, 500))
        assert uar(t, p) == pytest.approx(recall_score(t, p, average="macro"), abs=1e-6)


def test_uar_ignores_classes_only_predicted():
    t = np.array([0, 0, 1, 1])
    p = np.array([0, 2, 1, 1])  # class 2 never occurs in the truth
    assert uar(t, p) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_score(t, p, average="macro") == pytest.approx(1.5 / 3)  # sklearn counts class 2


def test_score_task_skips_unlabelled_rows_and_takes_argmax_of_probabilities():
    labels = np.array([[0.0], [1.0], [np.nan], [1.0]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3]])
    padded = np.zeros((4, 8))
    padded[:, :2] = probs
    assert score_task(AVB["type"], labels, padded) == {"type_uar": pytest.approx((1.0 + 0.5) / 2),
                                                       "type_accuracy": pytest.approx(2 / 3),
                                                       "type_f1": pytest.approx(2 / 3)}


def test_score_all_means_the_four_headline_scores():
    rng = np.random.default_rng(3)
    n = 120
    labels = {"type": rng.integers(0, 8, (n, 1)).astype(float)}
    preds = {"type": rng.random((n, 8))}
    for name in ("two", "high", "culture"):
        k = AVB[name].label_dim
        labels[name] = rng.random((n, k))
        preds[name] = labels[name] * 0.5 + rng.random((n, k)) * 0.5
    out = score_all(AVB, labels, preds)
    assert set(out) == {"type_uar", "type_accuracy", "type_f1", "two_ccc", "two_pearson", "high_ccc", "high_pearson",
                        "culture_ccc", "culture_pearson", "mean"}
    hand = np.mean([np.mean([hand_ccc(labels[t][:, j], preds[t][:, j]) for j in range(labels[t].shape[1])])
                    for t in ("two", "high", "culture")] + [recall_score(labels["type"][:, 0], preds["type"].argmax(1),
                                                                       average="macro")])
    assert out["mean"] == pytest.approx(hand, abs=1e-6)


def test_macro_f1_matches_sklearn_over_the_classes_in_the_truth():
    rng = np.random.default_rng(4)
    for _ in range(5):
        t = rng.integers(0, 8, 300)
        t[t == 5] = 4  # class 5 never occurs in the truth ...
        p = np.where(rng.random(300) < 0.4, t, rng.integers(0, 8, 300))  # ... but is predicted
        want = f1_score(t, p, average="macro", labels=np.unique(t))
        assert macro_f1(t, p) == pytest.approx(want, abs=1e-9)


def test_score_task_accuracy_and_f1_match_sklearn():
    rng = np.random.default_rng(5)
    t = rng.integers(0, 8, 400)
    probs = rng.random((400, 8))
    probs[np.arange(400), t] += rng.random(400)  # better than chance
    labels = t.astype(float)[:, None]
    labels[::7] = np.nan  # unlabelled rows are skipped
    keep = ~np.isnan(labels[:, 0])
    out = score_task(AVB["type"], labels, probs)
    guess = probs[keep].argmax(1)
    assert out["type_accuracy"] == pytest.approx(accuracy_score(t[keep], guess), abs=1e-9)
    assert out["type_f1"] == pytest.approx(f1_score(t[keep], guess, average="macro", labels=np.unique(t[keep])),
                                           abs=1e-9)
    assert out["type_uar"] == pytest.approx(recall_score(t[keep], guess, average="macro"), abs=1e-9)


def test_scores_are_written_as_the_paper_prints_them():
    from heads.metrics import score_text

    assert [score_text(x) for x in (0.5686, -0.0123, 1.0, 0.0, 12.5)] == [".5686", "-.0123", "1.0000", ".0000",
                                                                          "12.5000"]
    assert score_text(0.02449, 3) == ".024" and score_text(None) == "" and score_text("n/a") == ""
