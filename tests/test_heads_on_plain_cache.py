"""Stage 2 end to end on a cache written with plain h5py (following cache/FORMAT.md, not our writer).

The features carry a known linear signal of the labels of a generated corpus, so every architecture x
weighting must learn every task far above chance, and each run's metrics.json must agree with `avb score`
on the run's own Val prediction files scored against the corpus.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from plain_cache import write_plain_h5

from extract.app.cli import main
from extract.corpus import read_corpus
from extract.synth import synthesize_corpus

DIMS = {"cnn": 48, "hidden_0": 64, "hidden_1": 64, "hidden_2": 64, "hidden_3": 64, "hidden_4": 64}


def write_plain_cache(path, corpus, rng):
    """A cache per FORMAT.md with nothing but h5py: features = labels @ W_layer + noise."""
    n = len(corpus.ids)
    onehot = np.zeros((n, 8))
    known = ~np.isnan(corpus.labels["type"][:, 0])
    onehot[known, corpus.labels["type"][known, 0].astype(int)] = 1.0
    regress = [np.nan_to_num(corpus.labels[t], nan=0.5) for t in ("two", "high", "culture")]
    signal = np.hstack([onehot] + regress)                      # [N, 60]
    signal = (signal - signal.mean(0)) / (signal.std(0) + 1e-6)
    pooled = {}
    for layer, dim in DIMS.items():
        w = rng.normal(size=(signal.shape[1], dim)) / np.sqrt(signal.shape[1])
        pooled[layer] = signal @ w + 0.1 * rng.normal(size=(n, dim))
    write_plain_h5(path, corpus.ids, list(corpus.splits), corpus.labels, pooled)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    corpus_root = synthesize_corpus(root / "corpus", clips=360, seed=11, max_seconds=0.6, progress=False)
    corpus = read_corpus(corpus_root)
    write_plain_cache(root / "plain.h5", corpus, np.random.default_rng(0))
    result = CliRunner().invoke(main, ["heads", "ablate", "--cache", str(root / "plain.h5"), "--out",
                                       str(root / "grid"), "--epochs", "8", "--hidden", "64", "--no-progress"])
    assert result.exit_code == 0, result.output
    return corpus_root, root / "grid", result.output


@pytest.mark.slow
def test_every_arch_and_weighting_learns_every_task_far_above_chance(grid):
    _, out, printed = grid
    rows = json.loads((out / "results.json").read_text())
    rows = rows["runs"]
    assert len(rows) == 12
    for row in rows:
        name = f"{row['arch']}-{row['weighting']}"
        assert row["type_uar"] > 0.8, name          # chance: 0.125
        for task in ("two", "high", "culture"):
            assert row[f"{task}_ccc"] > 0.7, (name, task)  # chance: 0
    assert "*VANILLA*" in printed and "*BRANCH*" in printed and "Dynamic Weight Average" in printed


@pytest.mark.slow
def test_metrics_json_agrees_with_avb_score_on_the_runs_own_files(grid):
    corpus_root, out, _ = grid
    for run in sorted(p for p in out.iterdir() if (p / "metrics.json").is_file()):
        metrics = json.loads((run / "metrics.json").read_text())
        files = sorted(str(p) for p in (run / "predictions" / "val").glob("A-VB-*.csv"))
        result = CliRunner().invoke(main, ["score", "--corpus", str(corpus_root), "--json", *files])
        assert result.exit_code == 0, result.output
        scored = json.loads(result.output)
        for key, value in scored.items():
            assert value == pytest.approx(metrics[key], abs=1e-6), (run.name, key)
