"""avb demo --quick: every stage's output, the printed tables, and resuming (skip / resume / redo)."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cache.reader import read_attrs
from extract.app.cli import main as avb
from extract.app.demo import STAGES
from heads.submission import read_submission
from heads.tasks import AVB

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # ~20-40 s for the first quick demo on a 2-core machine
N_STAGES = len(STAGES)


def demo(*args):
    return CliRunner().invoke(avb, ["demo", "--quick", "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One quick demo for the module, and a pristine copy of its folder."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = demo("--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    pristine = out.parent / "pristine"
    shutil.copytree(out, pristine, symlinks=True)
    return out, pristine, result.output


@pytest.fixture
def done(first_run):
    """The finished demo at its own path exactly as the first run left it (restored from the pristine copy,
    modification times included, before every test): no test sees what another one changed, in any order."""
    out, pristine, text = first_run
    shutil.rmtree(out)
    shutil.copytree(pristine, out, symlinks=True)
    return out, text


def table_rows(text: str) -> list[str]:
    return re.findall(r"^\| \*(VANILLA|CHAIN|BRANCH)\* \|", text, flags=re.M)


def test_quick_demo_writes_every_stage_output(done):
    out, _ = done
    attrs = read_attrs(out / "cache.h5")
    assert attrs["n_clips"] == 48
    assert attrs["layers"] == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
    assert attrs["backbone"]["name_or_path"] == str(out / "finetune" / "backbone")
    # fine-tuning moved the random backbone's weights
    before = load_file(str(out / "pretrained" / "model.safetensors"))
    after = load_file(str(out / "finetune" / "backbone" / "model.safetensors"))
    moved = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2

    runs = sorted(p.name for p in (out / "ablation").iterdir() if (p / "metrics.json").is_file())
    weightings = ("uniform", "dwa", "rruw", "druw")
    assert runs == sorted(f"{a}-{w}-s0" for a in ("vanilla", "chain", "branch") for w in weightings)
    assert (out / "ablation" / "results.md").is_file() and (out / "ablation" / "results.csv").is_file()

    test_ids = None
    for task in AVB:
        got_task, ids, values = read_submission(out / "ensemble" / f"A-VB-{task.file_stem}_avb_1.csv", AVB)
        assert got_task is task and len(ids) == 16  # a third of 48 clips is Test
        test_ids = test_ids or ids
        assert ids == test_ids
    assert (out / "report" / "index.html").read_text().lstrip().lower().startswith("<!doctype html")

    with open(out / "predict" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["path"]).name for r in rows] == ["00001.wav", "00002.wav", "00003.wav"]
    for row in rows:
        probs = np.array([float(row[f"p_{c}"]) for c in AVB["type"].classes])
        assert abs(probs.sum() - 1) < 1e-6


def test_printed_output_has_the_table_the_ensemble_row_and_stage_times(done):
    out, text = done
    assert table_rows(text) == ["VANILLA", "CHAIN", "BRANCH"] * 4
    assert (out / "ablation" / "results.md").read_text().strip() in text
    metrics = json.loads((out / "ensemble" / "metrics.json").read_text())
    keys = [AVB.headline_keys[n] for n in AVB.names] + ["mean"]
    assert "combined ensemble (Table II): " + "  ".join(f"{k} {metrics[k]:.4f}" for k in keys) in text
    for i, stage in enumerate(STAGES, start=1):
        assert f"=== [{i}/{N_STAGES}] {stage.name}:" in text
        assert re.search(rf"^  {stage.name} +\d+\.\d s$", text, flags=re.M), stage.name
    assert str(out / "report" / "index.html") in text and str(out / "cache.h5") in text


def test_a_rerun_skips_every_completed_stage(done):
    out, first = done
    result = demo("--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == N_STAGES
    assert result.output.count("skipped (done earlier)") == N_STAGES
    assert table_rows(result.output) == table_rows(first)


def test_a_demo_stopped_by_sigint_exits_130_in_one_line_and_the_rerun_resumes_to_the_same_results(done, monkeypatch):
    """A real SIGINT (Ctrl-C) while the ablation trains: one line, exit 130, no temporary or lock left, and the
    rerun skips the four finished stages and resumes the ablation to byte-identical results."""
    import os
    import signal

    from cache.command_kit.interrupt import MESSAGE
    from heads.training import joint as train_mod

    out, _ = done
    ablation = out / "ablation"
    before = {p.relative_to(out): p.read_bytes() for p in ablation.rglob("*") if p.is_file()}
    for run in ablation.glob("chain-*-s0"):                        # one whole joint group left to train
        (run / "metrics.json").unlink()
    stamp = json.loads((out / ".stages" / "ablation.json").read_text())
    (out / ".stages" / "ablation.json").write_text(json.dumps({**stamp, "done": False}))
    real = train_mod.write_json_atomic

    def ctrl_c(path, obj):
        if Path(path).name == "metrics.json":
            os.kill(os.getpid(), signal.SIGINT)
        real(path, obj)

    monkeypatch.setattr(train_mod, "write_json_atomic", ctrl_c)
    result = demo("--out", out)
    monkeypatch.undo()
    assert result.exit_code == 130, (result.output, result.exception)
    assert result.stderr.rstrip("\n").splitlines()[-1] == MESSAGE and result.stderr.count(MESSAGE) == 1
    assert [p for p in out.rglob(".*") if ".tmp" in p.name or p.name.endswith(".avb-lock")] == []
    result = demo("--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == 4          # synth, backbone, finetune, dump
    after = {p.relative_to(out): p.read_bytes() for p in ablation.rglob("*") if p.is_file()}
    assert sorted(after) == sorted(before)
    changed = [str(k) for k in before if before[k] != after[k]]
    assert changed == [], "\n".join(changed)


def test_an_interrupted_stage_resumes_and_a_changed_setting_redoes_its_stage_and_later_ones(done):
    out, _ = done
    ablation = out / "ablation"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in ablation.glob("*/metrics.json")}
    # Interrupt the ablation: one run unfinished, the stage not marked done.
    (ablation / "chain-dwa-s0" / "metrics.json").unlink()
    stamp = json.loads((out / ".stages" / "ablation.json").read_text())
    (out / ".stages" / "ablation.json").write_text(json.dumps({**stamp, "done": False}))

    result = demo("--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == 4          # synth, backbone, finetune, dump
    after = {p.parent.name: p.stat().st_mtime_ns for p in ablation.glob("*/metrics.json")}
    assert sorted(after) == sorted(mtimes)
    assert [name for name in after if after[name] != mtimes[name]] == ["chain-dwa-s0"]  # only it was trained

    # Fewer head epochs: the first four stages stay, the ablation is redone from scratch.
    result = demo("--out", out, "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == 4
    histories = [json.loads(p.read_text())["history"] for p in ablation.glob("*/metrics.json")]
    assert len(histories) == 12 and all(len(h) == 2 for h in histories)
    assert table_rows(result.output) == ["VANILLA", "CHAIN", "BRANCH"] * 4


def test_a_foreign_folder_and_a_too_small_corpus_are_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = demo("--out", tmp_path)
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        f"Error: --out {tmp_path} is not empty and holds no demo.json; choose a new or empty folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    result = demo("--out", tmp_path / "new", "--clips", 12)
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: --clips must be at least 30")
