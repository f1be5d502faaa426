"""A corpus described by a corpus.yaml, end to end as a user types it, with no A-VB assumption left:
synth (described) -> corpus check -> finetune -> dump -> ablate (every arch x weighting) -> probe -> ensemble ->
predict -> score -> report.

The generated corpus has a 7-class emotion, a 2-class intensity and a 2-column valence/arousal regression on a
1..9 scale, speakers, and FLAC audio. The one-process commands run in-process through click's CliRunner.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_model import make_tiny_backbone

from cache.reader import load_cache
from extract.app.cli import main as avb
from extract.description import open_corpus
from heads.metrics import score_all
from heads.names import ARCHS, PAPER_WEIGHTINGS
from heads.tasks import tasks_of
from heads.training.folds import cache_folds

pytestmark = pytest.mark.slow


def avb_run(*args: object):
    res = CliRunner().invoke(avb, [str(a) for a in args])
    assert res.exit_code == 0, f"avb {' '.join(map(str, args[:6]))} ...\n{res.output[-3000:]}\n{res.exception!r}"
    return res


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_described_corpus_end_to_end(tmp_path):
    corpus_dir, ft, cache, grid = tmp_path / "corpus", tmp_path / "ft", tmp_path / "feats.h5", tmp_path / "grid"
    avb_run("synth", "--out", corpus_dir, "--layout", "described", "--clips", "60", "--max-seconds", "2",
            "--seed", "5", "--no-progress")
    corpus = open_corpus(corpus_dir)
    tasks = corpus.tasks
    assert tasks.names == ("emotion", "intensity", "affect") and not tasks.is_avb
    assert not list(corpus_dir.rglob("*.wav"))          # FLAC only: no WAV reader path is involved

    check = avb_run("corpus", "check", "--corpus", corpus_dir)
    assert "emotion" in check.output and "affect" in check.output

    model = make_tiny_backbone(tmp_path / "pretrained")
    avb_run("finetune", "--corpus", corpus_dir, "--model", model, "--out", ft, "--epochs", "1", "--batch-size", "4",
            "--eval-batch-size", "8", "--lr-backbone", "1e-3", "--no-progress")
    assert tasks_of(json.loads((ft / "config.json").read_text()), "ft") == tasks
    avb_run("dump", "--corpus", corpus_dir, "--model", ft / "backbone", "--out", cache, "--batch-size", "8",
            "--no-progress")

    # The cache records the description and holds the corpus's labels.
    data = load_cache(cache)
    assert tasks_of(data.attrs) == tasks
    assert data.ids.tolist() == corpus.ids
    for name in tasks.names:
        np.testing.assert_array_equal(data.labels[name], corpus.labels[name])

    avb_run("heads", "ablate", "--cache", cache, "--out", grid, "--epochs", "2", "--hidden", "16", "--n-heads", "2",
            "--branch-blocks", "2", "--no-progress", "--n-boot", "50")
    rows = read_csv(grid / "results.csv")
    assert len(rows) == len(ARCHS) * len(PAPER_WEIGHTINGS)
    for key in ("emotion_uar", "emotion_accuracy", "emotion_f1", "intensity_uar", "affect_ccc", "affect_pearson",
                "mean", "mean_ci_low"):
        assert key in rows[0]
    table = (grid / "results.md").read_text()
    assert "emotion UAR" in table and "affect CCC" in table and "A-VB" not in table

    # A run's prediction files: the id column, class names, probabilities, values on the labels' own scale.
    run = next(p for p in sorted(grid.iterdir()) if (p / "metrics.json").is_file())
    val = run / "predictions" / "val"
    emotion = read_csv(val / "emotion.csv")
    assert list(emotion[0]) == ["id", "emotion"]
    assert {r["emotion"] for r in emotion} <= set(tasks["emotion"].classes)
    probs = read_csv(val / "emotion_probs.csv")
    assert list(probs[0]) == ["id"] + [f"p_{c}" for c in tasks["emotion"].classes]
    np.testing.assert_allclose([sum(float(v) for k, v in r.items() if k != "id") for r in probs], 1.0, atol=1e-6)
    affect = read_csv(val / "affect.csv")
    values = np.array([[float(r["valence"]), float(r["arousal"])] for r in affect])
    low, high = tasks["affect"].low, tasks["affect"].high
    assert high > 1.5 and values.min() >= low and values.max() <= high    # not squeezed into [0, 1]

    # avb score on those files gives the run's own metrics.json figures.
    files = [val / f"{name}.csv" for name in tasks.names]
    scored = json.loads(avb_run("score", "--corpus", corpus_dir, "--split", "Val", "--json", *files).output)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in tasks.metric_keys:
        assert scored[key] == pytest.approx(metrics[key], abs=1e-6)

    avb_run("probe", "--cache", cache, "--out", tmp_path / "probe")
    probe_rows = read_csv(tmp_path / "probe" / "probe.csv")
    assert {r["task"] for r in probe_rows} == set(tasks.names)

    ens = tmp_path / "ens"
    avb_run("ensemble", grid, "--out", ens, "--n-boot", "50")
    ens_metrics = json.loads((ens / "metrics.json").read_text())
    rows_val = data.indices("Val")
    assert set(ens_metrics) >= set(tasks.metric_keys)
    assert (ens / "predictions" / "test" / "emotion.csv").is_file()
    assert not list(ens.glob("A-VB-*.csv"))
    # The ensemble's figures are those of its written Val files, rescored independently here.
    preds = {}
    order = np.argsort(data.ids[rows_val])
    for task in tasks:
        written = read_csv(ens / "predictions" / "val" / f"{task.name}.csv")
        assert [r["id"] for r in written] == sorted(data.ids[rows_val].tolist())
        if task.is_classification:
            preds[task.name] = np.array([task.classes.index(r[task.columns[0]]) for r in written])
        else:
            preds[task.name] = np.array([[float(r[c]) for c in task.columns] for r in written])
    labels = {name: data.labels[name][rows_val][order] for name in tasks.names}
    rescored = score_all(tasks, labels, preds)
    for key in tasks.metric_keys:
        assert ens_metrics[key] == pytest.approx(rescored[key], abs=1e-6)

    audio = [corpus.audio_path(i) for i in corpus.ids[:3]]
    out_csv = tmp_path / "pred.csv"
    avb_run("predict", *audio, "--model", ft / "backbone", "--heads", ens, "--out", out_csv, "--device", "cpu",
            "--no-progress")
    predicted = read_csv(out_csv)
    assert list(predicted[0]) == (["path", "emotion"] + [f"p_{c}" for c in tasks["emotion"].classes]
                                  + ["intensity"] + [f"p_{c}" for c in tasks["intensity"].classes]
                                  + ["valence", "arousal"])
    assert [Path(r["path"]) for r in predicted] == audio

    # Export: the ensemble (with the backbone its cache came from) and the fine-tuning output (its own backbone)
    # each become a folder whose ONNX graph, run without torch's path, predicts what PyTorch predicts.
    for source, model_args in ((ens, ["--model", ft / "backbone"]), (ft, [])):
        folder, onnx_csv, torch_csv = tmp_path / f"export-{source.name}", tmp_path / "o.csv", tmp_path / "t.csv"
        avb_run("export", "--heads", source, *model_args, "--out", folder, "--no-progress")
        config = json.loads((folder / "config.json").read_text())
        assert tasks_of(config, "export") == tasks and config["parity"]["max_abs_diff"] <= 1e-4
        avb_run("predict", *audio, "--model-dir", folder, "--out", onnx_csv, "--no-progress")
        avb_run("predict", *audio, "--heads", source, *model_args, "--out", torch_csv, "--no-progress")
        for a, b in zip(read_csv(onnx_csv), read_csv(torch_csv), strict=True):
            assert a["emotion"] == b["emotion"] and a["intensity"] == b["intensity"]
            for column in a:
                if column not in ("path", "emotion", "intensity"):
                    assert abs(float(a[column]) - float(b[column])) <= 1e-4, column
        assert 1.0 <= min(float(r["valence"]) for r in read_csv(onnx_csv))   # labels on 1..9 come out on 1..9
    card = (tmp_path / f"export-{ft.name}" / "README.md").read_text()
    assert "fine-tuned end to end with its backbone" in card and "no intervals" in card

    avb_run("report", grid, ens, tmp_path / "probe", "--out", tmp_path / "report")
    assert (tmp_path / "report" / "index.html").is_file()


@pytest.mark.parametrize("task_list", ["emotion", "affect"])
def test_one_task_and_regression_only_corpora_train_and_ensemble(tmp_path, task_list):
    """K = 1 (a classification task alone, a regression task alone): dump, every architecture and weighting,
    the ensemble, scores equal to the written predictions rescored."""
    corpus_dir, cache, grid = tmp_path / "corpus", tmp_path / "feats.h5", tmp_path / "grid"
    avb_run("synth", "--out", corpus_dir, "--layout", "described", "--clips", "40", "--max-seconds", "1.5",
            "--seed", "2", "--tasks", task_list, "--audio-format", "wav", "--no-progress")
    model = make_tiny_backbone(tmp_path / "pretrained")
    avb_run("dump", "--corpus", corpus_dir, "--model", model, "--out", cache, "--batch-size", "8", "--no-progress")
    tasks = tasks_of(load_cache(cache, layers=[]).attrs)
    assert tasks.names == (task_list,)
    avb_run("heads", "ablate", "--cache", cache, "--out", grid, "--epochs", "1", "--hidden", "16", "--n-heads", "2",
            "--branch-blocks", "2", "--no-progress", "--n-boot", "20")
    rows = read_csv(grid / "results.csv")
    assert len(rows) == len(ARCHS) * len(PAPER_WEIGHTINGS)
    headline = tasks[task_list].headline_key
    for row in rows:       # with one task, the selection score is that task's headline score
        assert float(row["mean"]) == pytest.approx(float(row[headline]), abs=1e-12)
    avb_run("ensemble", grid, "--out", tmp_path / "ens", "--strategy", "mean", "--top-k", "3", "--ci", "0")
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert metrics["mean"] == pytest.approx(metrics[headline], abs=1e-12)


def test_speaker_independent_folds_from_one_dump_and_the_leakage_guard(tmp_path):
    """--folds 4 on a described corpus with 8 speakers: group-disjoint folds, round k trains without folds k and
    k+1, selects on k+1, is scored on k (the tables' figures equal the written predictions rescored here); a
    backbone fine-tuned for round 1 serves round 1 and is refused wherever it would be scored on its own
    training clips."""
    corpus_dir, cache, grid = tmp_path / "corpus", tmp_path / "feats.h5", tmp_path / "cv"
    avb_run("synth", "--out", corpus_dir, "--layout", "described", "--clips", "64", "--max-seconds", "1.5",
            "--seed", "4", "--speakers", "8", "--audio-format", "wav", "--no-progress")
    model = make_tiny_backbone(tmp_path / "pretrained")
    avb_run("dump", "--corpus", corpus_dir, "--model", model, "--out", cache, "--batch-size", "8", "--no-progress")
    data = load_cache(cache)
    tasks = tasks_of(data.attrs)
    assert data.clip_info["group"].tolist() == open_corpus(corpus_dir).groups

    avb_run("heads", "ablate", "--cache", cache, "--out", grid, "--folds", "4", "--archs", "vanilla,chain",
            "--weightings", "uniform", "--epochs", "1", "--hidden", "16", "--no-progress", "--n-boot", "30")
    assignment = read_csv(grid / "folds.csv")
    assert [r["id"] for r in assignment] == data.ids.tolist()
    fold_of = np.array([int(r["fold"]) for r in assignment])
    groups = np.array([r["group"] for r in assignment])
    assert sorted(set(fold_of)) == [-1, 0, 1, 2, 3]
    unlabelled = np.all([np.isnan(data.labels[n]).all(axis=1) for n in tasks.names], axis=0)
    np.testing.assert_array_equal(fold_of == -1, unlabelled)      # the unlabelled Test rows are in no fold
    for g in set(groups):                      # no speaker in two folds
        assert len(set(fold_of[groups == g])) == 1

    rounds = read_csv(grid / "crossval.csv")
    assert len(rounds) == 2 * 4
    pooled_preds: dict[str, list] = {t: [] for t in tasks.names}
    pooled_rows = []
    for k in range(4):
        run = grid / f"fold-{k}" / "vanilla-uniform-s0"
        val_ids = [r["id"] for r in read_csv(run / "predictions" / "val" / "emotion.csv")]
        test_ids = [r["id"] for r in read_csv(run / "predictions" / "test" / "emotion.csv")]
        assert sorted(val_ids) == sorted(data.ids[fold_of == (k + 1) % 4].tolist())     # selected on fold k+1
        assert sorted(test_ids) == sorted(data.ids[fold_of == k].tolist())              # scored on fold k
        rows = np.flatnonzero(fold_of == k)
        order = rows[np.argsort(data.ids[rows])]
        preds = {}
        for task in tasks:
            written = read_csv(run / "predictions" / "test" / f"{task.name}.csv")
            if task.is_classification:
                preds[task.name] = np.array([task.classes.index(r[task.columns[0]]) for r in written])
            else:
                preds[task.name] = np.array([[float(r[c]) for c in task.columns] for r in written])
            pooled_preds[task.name].append(preds[task.name])
        pooled_rows.append(order)
        scores = score_all(tasks, {n: data.labels[n][order] for n in tasks.names}, preds)
        row = next(r for r in rounds if r["run"] == "vanilla-uniform-s0" and int(r["fold"]) == k)
        for key in tasks.metric_keys:
            assert float(row[key]) == pytest.approx(scores[key], abs=1e-9)
    order = np.concatenate(pooled_rows)
    pooled = score_all(tasks, {n: data.labels[n][order] for n in tasks.names},
                       {n: np.concatenate(p) for n, p in pooled_preds.items()})
    summary = json.loads((grid / "crossval.json").read_text())
    entry = next(s for s in summary["summary"] if s["run"] == "vanilla-uniform-s0")
    assert entry["pooled"]["mean"] == pytest.approx(pooled["mean"], abs=1e-9)
    low, high = entry["pooled_ci"]["mean"]
    assert low <= entry["pooled"]["mean"] <= high
    assert "pooled" in (grid / "crossval.md").read_text()

    # A round's runs ensemble as that round sees the cache: selected on fold k+1 (its Val), Test = fold k.
    avb_run("ensemble", grid / "fold-2", "--out", tmp_path / "ens2", "--ci", "0")
    ens_val = read_csv(tmp_path / "ens2" / "predictions" / "val" / "emotion.csv")
    assert sorted(r["id"] for r in ens_val) == sorted(data.ids[fold_of == 3].tolist())
    ens_test = read_csv(tmp_path / "ens2" / "predictions" / "test" / "emotion.csv")
    assert sorted(r["id"] for r in ens_test) == sorted(data.ids[fold_of == 2].tolist())
    mixed = CliRunner().invoke(avb, ["ensemble", str(grid / "fold-0" / "vanilla-uniform-s0"),
                                     str(grid / "fold-1" / "vanilla-uniform-s0"), "--out", str(tmp_path / "mixed")])
    assert mixed.exit_code == 1 and "different cross-validation rounds" in mixed.output

    # Stage 1 for round 1: fine-tuned without folds 1 (evaluated) and 2 (selection); its dump marks the clips.
    ft, cache1 = tmp_path / "ft1", tmp_path / "feats1.h5"
    avb_run("finetune", "--corpus", corpus_dir, "--model", model, "--out", ft, "--epochs", "1", "--batch-size", "4",
            "--eval-batch-size", "8", "--folds", "4", "--fold", "1", "--no-progress")
    avb_run("dump", "--corpus", corpus_dir, "--model", ft / "backbone", "--out", cache1, "--batch-size", "8",
            "--no-progress")
    trained = load_cache(cache1, layers=[]).clip_info["backbone_trained"].astype(bool)
    assert set(fold_of[trained]) <= {0, 3} and trained.any()
    avb_run("heads", "ablate", "--cache", cache1, "--out", tmp_path / "cv1", "--folds", "4", "--fold", "1",
            "--archs", "vanilla", "--weightings", "uniform", "--epochs", "1", "--hidden", "16", "--no-progress",
            "--ci", "0")
    assert (tmp_path / "cv1" / "fold-1" / "vanilla-uniform-s0" / "metrics.json").is_file()
    for args in (["--folds", "4", "--fold", "0"], []):     # round 0 is scored on fold 0; the corpus's own splits
        res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache1), "--out", str(tmp_path / "bad"),
                                       "--archs", "vanilla", "--weightings", "uniform", "--epochs", "1",
                                       "--hidden", "16", "--no-progress", *args])
        assert res.exit_code == 1, res.output
        assert "the backbone was fine-tuned on it" in res.output and "would leak" in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_fold_requests_the_groups_cannot_serve_are_one_line(tmp_path):
    corpus_dir, cache = tmp_path / "corpus", tmp_path / "feats.h5"
    avb_run("synth", "--out", corpus_dir, "--layout", "described", "--clips", "24", "--max-seconds", "1",
            "--seed", "1", "--speakers", "4", "--audio-format", "wav", "--no-progress")
    avb_run("dump", "--corpus", corpus_dir, "--model", make_tiny_backbone(tmp_path / "pretrained"), "--out", cache,
            "--batch-size", "8", "--no-progress")
    corpus = open_corpus(corpus_dir)
    labelled = ~np.isnan(corpus.labels["emotion"][:, 0])
    n_groups = len({g for g, known in zip(corpus.groups, labelled) if known})     # Test speakers are unlabelled
    assert n_groups == 3
    for args, message in ((["--folds", "4"], "--folds 4 asks for more folds than the 3 groups in column 'group'"),
                          (["--folds", "2"], "K must be >= 3"),
                          (["--folds", "3", "--fold", "3"], "fold 3 is not one of 0..2")):
        res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache), "--out", str(tmp_path / "cv"),
                                       "--archs", "vanilla", "--weightings", "uniform", "--epochs", "1", *args])
        assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "cv" / "fold-0").exists()
    res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache), "--out", str(tmp_path / "cv"),
                                   "--fold", "1"])
    assert res.exit_code == 2 and "--fold needs --folds K" in res.output
    res = CliRunner().invoke(avb, ["heads", "train", "--cache", str(cache), "--out", str(tmp_path / "r"),
                                   "--folds", "3"])
    assert res.exit_code == 2 and "give --fold k" in res.output
    avb_run("heads", "train", "--cache", cache, "--out", tmp_path / "r", "--folds", "3", "--fold", "2",
            "--epochs", "1", "--hidden", "8", "--no-progress")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["cv_round"] == {"folds": 3, "fold": 2, "seed": 0}
    data = load_cache(cache, layers=[])
    val_ids = sorted(r["id"] for r in read_csv(tmp_path / "r" / "predictions" / "val" / "emotion.csv"))
    assert val_ids == sorted(data.ids[cache_folds(data, 3) == 0].tolist())   # select fold of round 2: 0
