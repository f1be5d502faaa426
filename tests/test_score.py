"""`avb score` agrees with sklearn/scipy/hand formulas on random predictions, in any row order."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import val_labels
from scipy.stats import pearsonr
from sklearn.metrics import recall_score

from extract.app.cli import main
from extract.synth import synthesize_corpus
from heads.submission import PROBS_FILE, write_predictions
from heads.tasks import AVB


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("score") / "corpus", clips=90, seed=4, max_seconds=1.0,
                             progress=False)


def pop_ccc(x, y):
    return 2 * np.mean((x - x.mean()) * (y - y.mean())) / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_score_matches_independent_references_in_any_row_order(corpus_root, tmp_path):
    rng = np.random.default_rng(0)
    truth, preds = {}, {}
    ids = None
    for name, task in zip(AVB.names, AVB):
        ids, truth[name] = val_labels(corpus_root, task)
        if task.is_classification:
            preds[name] = rng.random((len(ids), 8))
        else:
            preds[name] = np.clip(truth[name] * 0.5 + rng.random(truth[name].shape) * 0.5, 0, 1)
    files = [p for p in write_predictions(tmp_path, AVB, ids, preds, team="t", number=1) if p.name != PROBS_FILE]
    for path in files:  # shuffle row order: scoring must match by File_ID
        lines = path.read_text().splitlines()
        body = lines[1:]
        rng.shuffle(body)
        path.write_text("\n".join([lines[0]] + body) + "\n")
    result = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), "--split", "Val", "--json",
                                       *map(str, files)])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert list(got) == ["type_uar", "type_accuracy", "type_f1", "two_ccc", "two_pearson", "high_ccc",
                         "high_pearson", "culture_ccc", "culture_pearson"]
    assert got["type_uar"] == pytest.approx(recall_score(truth["type"], preds["type"].argmax(1), average="macro"),
                                            abs=1e-6)
    for name in ("two", "high", "culture"):
        t, p = truth[name], preds[name]
        assert got[f"{name}_ccc"] == pytest.approx(np.mean([pop_ccc(t[:, j], p[:, j]) for j in range(t.shape[1])]),
                                                   abs=1e-6)
        assert got[f"{name}_pearson"] == pytest.approx(
            np.mean([pearsonr(t[:, j], p[:, j])[0] for j in range(t.shape[1])]), abs=1e-6)


def test_score_prints_a_table_for_a_subset_of_tasks(corpus_root, tmp_path):
    ids, truth = val_labels(corpus_root, AVB["two"])
    (path,) = write_predictions(tmp_path, AVB, ids, {"two": truth}, team="t", number=1)
    result = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), str(path)])
    assert result.exit_code == 0, result.output
    assert "A-VB-TWO" in result.output and "1.0000" in result.output and "A-VB-HIGH" not in result.output


def test_missing_extra_and_duplicate_task_files_are_clear_errors(corpus_root, tmp_path):
    ids, truth = val_labels(corpus_root, AVB["two"])
    (short,) = write_predictions(tmp_path / "a", AVB, ids[1:], {"two": truth[1:]}, team="t", number=1)
    result = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), str(short)])
    assert result.exit_code != 0
    assert f"File_ID [{ids[0]}] of the Val split has no prediction (1 missing)" in result.output
    (extra,) = write_predictions(tmp_path / "b", AVB, ids + ["99999"], {"two": np.vstack([truth, truth[:1]])},
                                 team="t", number=1)
    result = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), str(extra)])
    assert "File_ID [99999] is not in the Val split" in result.output
    (full,) = write_predictions(tmp_path / "c", AVB, ids, {"two": truth}, team="t", number=1)
    result = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), str(full), str(full)])
    assert "a second A-VB-TWO file" in result.output
