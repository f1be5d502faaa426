"""Stage 1 end to end, as a user types it: synth -> 2-process fine-tuning -> 2-process dump -> ablation -> score.

The two multi-process steps are real `accelerate launch --multi_gpu --num_processes 2` runs (a gloo group on
CPU); the one-process `avb` commands (synth, heads ablate, score) run in-process through click's CliRunner with
the very arguments a user types (the console entry point in a process of its own is exercised by
test_interruption.py's `python -m extract.app.cli heads ablate`). This is the stage-1 issue's "Done when": the
fine-tuned backbone directory feeds the dump, the dump's cache feeds `avb heads ablate`, and the Val predictions
an ablation run writes score, through `avb score`, to exactly the numbers in its metrics.json.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import subprocess_env
from tiny_model import make_tiny_backbone

from cache.reader import load_cache, read_attrs
from extract.app.cli import main as avb
from extract.corpus import read_corpus
from heads.names import ARCHS, PAPER_WEIGHTINGS
from heads.tasks import AVB

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:8])} ...\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def avb_run(*args: str):
    """`avb ARGS` in-process; asserts that it succeeded."""
    res = CliRunner().invoke(avb, [str(a) for a in args])
    assert res.exit_code == 0, f"avb {' '.join(map(str, args[:6]))} ...\n{res.output[-3000:]}\n{res.exception!r}"
    return res


def test_synth_finetune_dump_ablate_score(tmp_path):
    corpus, ft, cache, grid = tmp_path / "corpus", tmp_path / "ft", tmp_path / "feats.h5", tmp_path / "grid"
    avb_run("synth", corpus, "--clips", "36", "--max-seconds", "2", "--seed", "21", "--quiet")
    model = make_tiny_backbone(tmp_path / "pretrained")
    run(ACCELERATE_2 + ["-m", "extract.finetune", "--quiet", "--corpus", str(corpus), "--model", str(model),
                        "--out", str(ft), "--epochs", "2", "--batch-size", "2", "--eval-batch-size", "4",
                        "--lr-backbone", "1e-3"])
    run(ACCELERATE_2 + ["-m", "extract.dump", "--corpus", str(corpus), "--model", str(ft / "backbone"), "--out",
                        str(cache), "--batch-size", "4", "--quiet"])
    ablate = avb_run("heads", "ablate", "--cache", cache, "--out", grid, "--epochs", "2", "--hidden", "16",
                     "--n-heads", "2", "--branch-blocks", "2", "--no-progress")

    # Fine-tuning: 12 Train clips / (2 per process x 2 processes) = 3 steps per epoch, two epochs.
    metrics_ft = json.loads((ft / "metrics.json").read_text())
    assert [(h["epoch"], h["step"]) for h in metrics_ft["history"]] == [(1, 3), (2, 6)]
    assert json.loads((ft / "config.json").read_text())["processes"] == 2

    # The cache: every clip of the corpus, in corpus order, with its split and labels, from the fine-tuned backbone.
    data = read_corpus(corpus)
    features = load_cache(cache)
    assert features.ids.tolist() == data.ids
    assert features.splits.tolist() == [str(s) for s in data.splits]
    for task in AVB.names:
        np.testing.assert_array_equal(features.labels[task], data.labels[task])
    attrs = read_attrs(cache)
    assert attrs["backbone"]["name_or_path"] == str(ft / "backbone") and attrs["n_clips"] == 36
    assert features.layers == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
    assert all(np.isfinite(v.astype(np.float32)).all() for v in features.pooled.values())
    assert not list(tmp_path.glob("feats.h5.shard-*"))

    # The ablation: 3 architectures x 4 weightings, a table with 12 rows, every run complete.
    runs = [f"{a}-{w}-s0" for a in ARCHS for w in PAPER_WEIGHTINGS]
    assert sorted(p.name for p in grid.iterdir() if p.is_dir()) == sorted(runs)
    table = (grid / "results.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| *") and not line.startswith("| **")]
    assert len(body) == 12 and table in ablate.stdout
    with open(grid / "results.csv", newline="") as fh:
        assert sorted(f"{r['arch']}-{r['weighting']}-s{r['seed']}" for r in csv.DictReader(fh)) == sorted(runs)

    # `avb score` on a run's Val prediction files gives exactly its metrics.json (the default split is Val: one
    # run also scored with an explicit --split Val gives the same numbers).
    def val_files(name: str) -> list[str]:
        files = sorted(str(p) for p in (grid / name / "predictions" / "val").glob("A-VB-*.csv"))
        assert len(files) == 4, name
        return files

    scored = json.loads(avb_run("score", "--corpus", corpus, "--split", "Val", "--json",
                                *val_files("branch-druw-s0")).stdout)
    for name in runs:
        metrics = json.loads((grid / name / "metrics.json").read_text())
        got = json.loads(avb_run("score", "--corpus", corpus, "--json", *val_files(name)).stdout)
        if name == "branch-druw-s0":
            assert got == scored
        assert set(got) == set(AVB.metric_keys)
        for key in AVB.metric_keys:
            assert got[key] == pytest.approx(metrics[key], abs=1e-6), (name, key)
