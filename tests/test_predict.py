"""avb predict: new audio of any rate/channels -> the heads' predictions, equal to the cached-feature path."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import TOL, read_csv, row_values, run_val_predictions
from predict_world import val_wavs
from tiny_model import make_tiny_backbone

from extract.app.cli import main as avb
from extract.audio import AUDIO_EXTENSIONS, write_wav
from heads.analysis.ensemble import EnsembleConfig, build_ensemble
from heads.tasks import AVB, COUNTRIES, EMOTIONS, TYPE_CLASSES

torch.set_num_threads(1)

# Float16 features in the cache vs float32 features here: outputs agree to ~5e-5 (measured); 10x margin.


@pytest.fixture
def world(predict_world):
    return predict_world


def invoke(*args) -> object:
    return CliRunner().invoke(avb, ["predict", *map(str, args), "--quiet"])


def error_line(result) -> str:
    """The last line of the output (transformers may print a weight-loading bar before it)."""
    return result.output.strip().splitlines()[-1]


def expected_columns() -> list[str]:
    """Built from the official lists (not from Predictions.columns): 2 + 8 + 2 + 10 + 40 = 62 columns."""
    culture = [f"{c}_{e}" for c in COUNTRIES for e in EMOTIONS if e != "Surprise"]
    culture += [f"{c}_Surprise" for c in COUNTRIES]
    return ["path", "Voc_Type"] + [f"p_{c}" for c in TYPE_CLASSES] + ["Valence", "Arousal"] + list(EMOTIONS) + culture


# ------------------------------------------------------------------------------------------------ tests

def test_mixed_rates_and_channels_give_one_row_per_file_with_the_specified_columns(world, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "audio"
    t = lambda rate, s: np.arange(int(rate * s)) / rate  # noqa: E731
    write_wav(folder / "a_8k_mono.wav", 0.3 * np.sin(2 * np.pi * 220 * t(8000, 1.2)), 8000)
    left, right = 0.2 * np.sin(2 * np.pi * 330 * t(44100, 3.1)), 0.1 * rng.standard_normal(int(44100 * 3.1))
    stereo = np.stack([left, right], 1)
    write_wav(folder / "b_44k_stereo.wav", stereo, 44100, "PCM_24")
    write_wav(folder / "sub" / "c_48k_mono.wav", 0.2 * rng.standard_normal(int(48000 * 0.7)), 48000, "FLOAT")
    write_wav(folder / "sub" / "d_48k_stereo.WAV", 0.2 * rng.standard_normal((48000, 2)), 48000)
    (folder / "sub" / "notes.txt").write_text("not audio")
    out = tmp_path / "pred.csv"

    result = invoke(folder, "--model", world["model"], "--heads", world["runs"]["vanilla"], "--out", out)

    assert result.exit_code == 0, result.output
    header, rows = read_csv(out)
    assert header == expected_columns() and len(header) == 62
    names = ["a_8k_mono.wav", "b_44k_stereo.wav", "sub/c_48k_mono.wav", "sub/d_48k_stereo.WAV"]
    assert [r["path"] for r in rows] == [str(folder / name) for name in names]
    for row in rows:
        values = row_values(row)
        assert abs(values["type"].sum() - 1.0) < 1e-6
        assert row["Voc_Type"] == TYPE_CLASSES[int(values["type"].argmax())]
        for name in ("two", "high", "culture"):
            assert ((values[name] >= 0) & (values[name] <= 1)).all()
    # different inputs give different outputs (the audio reaches the heads)
    assert len({row["Valence"] for row in rows}) == 4
    assert "wrote" in result.output and "4 files" in result.output


@pytest.mark.parametrize("arch", ["vanilla", "chain", "branch"])
def test_prediction_equals_the_head_applied_to_the_dumped_features_of_the_same_clip(world, tmp_path, arch):
    """The run's Val predictions were made by heads.training.joint from the cache; predict recomputes them from audio
    (cropped and padded clips alike; branch attends over the dump's frames at stride 2)."""
    wavs = val_wavs(world)
    out = tmp_path / "pred.csv"
    result = invoke(*wavs, "--model", world["model"], "--heads", world["runs"][arch], "--out", out,
                    "--batch-size", 4)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(w) for w in wavs]
    reference = run_val_predictions(world["runs"][arch])
    for wav, row in zip(wavs, rows):
        got, want = row_values(row), reference[wav.stem]
        for name in AVB.names:
            np.testing.assert_allclose(got[name], want[name], atol=TOL, err_msg=f"{wav.name} {name}")


def test_an_ensemble_dir_averages_its_members_per_task_like_the_ensemble_did(world, tmp_path):
    ens = tmp_path / "ens"
    build_ensemble([world["runs"]["vanilla"], world["runs"]["chain"]], ens, EnsembleConfig(strategy="mean", top_k=2))
    wavs = val_wavs(world, 4)
    out = tmp_path / "pred.csv"
    result = invoke(*wavs, "--model", world["model"], "--heads", ens, "--out", out)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out)
    ensemble_val = run_val_predictions(ens)
    vanilla, chain = run_val_predictions(world["runs"]["vanilla"]), run_val_predictions(world["runs"]["chain"])
    for wav, row in zip(wavs, rows):
        got = row_values(row)
        for name in AVB.names:
            np.testing.assert_allclose(got[name], ensemble_val[wav.stem][name], atol=TOL)
            np.testing.assert_allclose(got[name], 0.5 * (vanilla[wav.stem][name] + chain[wav.stem][name]), atol=TOL)


def test_a_backbone_with_other_layers_is_refused_naming_the_run_and_the_layers(world, tmp_path):
    other = make_tiny_backbone(tmp_path / "deeper", num_hidden_layers=3)
    run = world["runs"]["vanilla"]
    result = invoke(val_wavs(world, 2)[0], "--model", other, "--heads", run, "--out", tmp_path / "p.csv")
    assert result.exit_code != 0
    assert error_line(result) == (
        f"Error: run {run} was trained on features of a different backbone than --model {other}: its cache has "
        "layers cnn,hidden_0,hidden_1,hidden_2, the model gives cnn,hidden_0,...,hidden_3 (5)")
    assert not (tmp_path / "p.csv").exists()


def test_a_backbone_with_other_widths_or_architecture_is_refused(world, tmp_path):
    run = world["runs"]["chain"]
    wav = val_wavs(world, 2)[0]
    wider = make_tiny_backbone(tmp_path / "wider", hidden_size=48, intermediate_size=64)
    result = invoke(wav, "--model", wider, "--heads", run, "--out", tmp_path / "p.csv")
    assert result.exit_code != 0
    assert error_line(result).endswith("layer hidden_0 is 32-d in its cache and 48-d in the model")
    strided = make_tiny_backbone(tmp_path / "strided", conv_stride=(5, 8, 4))
    result = invoke(wav, "--model", strided, "--heads", run, "--out", tmp_path / "p.csv")
    assert result.exit_code != 0
    assert error_line(result).endswith("config field conv_stride is [5, 8, 8] in its cache and [5, 8, 4] in the model")


def test_a_bad_wav_stops_with_its_name_and_skip_bad_skips_it(world, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    good = val_wavs(world, 2)
    for wav in good:
        shutil.copy(wav, folder / wav.name)
    bad = folder / "broken.wav"
    bad.write_bytes(b"junk" * 20)
    out = tmp_path / "p.csv"

    result = invoke(folder, "--model", world["model"], "--heads", world["runs"]["vanilla"], "--out", out)
    assert result.exit_code != 0
    assert error_line(result).startswith(f"Error: {bad}: not a WAV file")
    assert result.output.count("Error:") == 1
    assert not out.exists()

    result = invoke(folder, "--model", world["model"], "--heads", world["runs"]["vanilla"], "--out", out, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert f"Warning: skipping {bad}: not a WAV file" in result.stderr
    _, rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(folder / w.name) for w in sorted(good)]
    assert "skipped 1 unreadable" in result.stdout


def test_missing_audio_and_non_head_dirs_are_named(world, tmp_path):
    model, run = world["model"], world["runs"]["vanilla"]
    result = invoke(tmp_path / "nope.wav", "--model", model, "--heads", run, "--out", tmp_path / "p.csv")
    assert result.exit_code != 0
    assert error_line(result) == f"Error: {tmp_path / 'nope.wav'}: no such file or folder"
    (tmp_path / "empty").mkdir()
    result = invoke(tmp_path / "empty", "--model", model, "--heads", run, "--out", tmp_path / "p.csv")
    assert error_line(result) == (f"Error: {tmp_path / 'empty'}: folder holds no audio files "
                                  f"({', '.join(sorted(AUDIO_EXTENSIONS))})")
    wav = val_wavs(world, 2)[0]
    result = invoke(wav, "--model", model, "--heads", tmp_path / "empty", "--out", tmp_path / "p.csv")
    assert result.exit_code != 0
    assert error_line(result) == (f"Error: --heads {tmp_path / 'empty'}: neither a run dir (config.json + "
                                     "head.safetensors), an ensemble dir (members.json) nor a fine-tuning output "
                                     "(config.json + backbone/)")


def test_the_best_trial_of_a_search_predicts_like_its_val_predictions(world, tmp_path):
    """A search's best trial is an ordinary run folder: `avb predict --heads` takes it and recomputes, from
    audio, the Val predictions the search saved for it."""
    pytest.importorskip("optuna")
    from heads.training.search import trial_dir

    (tmp_path / "space.yaml").write_text("lr: {low: 1.0e-4, high: 3.0e-3, log: true}\narch: [vanilla, chain]\n")
    search = CliRunner().invoke(avb, ["heads", "search", "--cache", str(world["cache"]), "--out", str(tmp_path / "s"),
                                      "--space", str(tmp_path / "space.yaml"), "--trials", "2", "--batch", "2",
                                      "--epochs", "2", "--hidden", "16", "--pruner", "none", "--no-progress"])
    assert search.exit_code == 0, search.output
    best = int(search.output.split("best: trial ")[1].split()[0])
    run = trial_dir(tmp_path / "s", best)
    wavs = val_wavs(world, 4)
    result = invoke(*wavs, "--model", world["model"], "--heads", run, "--out", tmp_path / "pred.csv")
    assert result.exit_code == 0, result.output
    _, rows = read_csv(tmp_path / "pred.csv")
    reference = run_val_predictions(run)
    for wav, row in zip(wavs, rows):
        for name in AVB.names:
            np.testing.assert_allclose(row_values(row)[name], reference[wav.stem][name], atol=TOL)
