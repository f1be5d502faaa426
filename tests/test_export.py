"""avb export and the ONNX path of avb predict: the exported graph reproduces PyTorch, runs without torch, and
carries its model card; long recordings in windows on both paths; the Predictor API."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import yaml
from click.testing import CliRunner
from helpers import read_csv, row_values, subprocess_env
from predict_world import val_wavs
from tiny_model import make_tiny_backbone

from extract.app.cli import main as avb
from extract.audio import load_audio
from extract.serve.exported import EXPORT_FORMAT
from extract.serve.model_card import EXAMPLE
from extract.serve.predictor import Predictor
from heads.analysis.ensemble import EnsembleConfig, build_ensemble
from heads.tasks import AVB

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ONNX_TOL = 1e-4      # the bound between onnxruntime and PyTorch outputs
# Blocks `import torch` (and so transformers) in a child process: the --model-dir path must not need them.
NO_TORCH = ("import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ImportError(f'{name} is blocked in this test')\n"
            "sys.meta_path.insert(0, _Block())\n")


def invoke(*args):
    return CliRunner().invoke(avb, [*map(str, args)])


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def exported(predict_world, tmp_path_factory):
    """An ensemble of the vanilla run and the frame-mode branch run, and its export."""
    root = tmp_path_factory.mktemp("export")
    ens = root / "ens"
    build_ensemble([predict_world["runs"]["vanilla"], predict_world["runs"]["branch"]], ens,
                   EnsembleConfig(strategy="mean", top_k=2, n_boot=50))
    out = root / "exported"
    result = invoke("export", "--heads", ens, "--model", predict_world["model"], "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return {"ens": ens, "out": out, "output": result.output}


def compare(a: list[dict], b: list[dict], atol: float) -> float:
    """Largest difference between two predict CSVs' numeric columns (and the same class names)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if key in ("path", "Voc_Type"):
                assert value == y[key], key
            else:
                worst = max(worst, abs(float(value) - float(y[key])))
    assert worst <= atol, worst
    return worst


# --------------------------------------------------------------------------------------------- export

def test_an_exported_ensemble_holds_its_files_and_matches_pytorch_within_1e4(predict_world, exported):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "backbone", "config.json", "heads.safetensors",
                                                     "model.onnx"]
    config = json.loads((out / "config.json").read_text())
    assert config["export_format"] == EXPORT_FORMAT and config["outputs"] == list(AVB.names)
    assert config["source"]["kind"] == "ensemble" and len(config["source"]["runs"]) == 2
    assert config["parity"]["max_abs_diff"] <= ONNX_TOL and config["parity"]["batches"] == [[3, 40000], [2, 24000]]
    assert config["columns"]["type"] == [f"p_{c}" for c in AVB["type"].classes]
    assert "largest difference" in exported["output"]
    # the backbone is a transformers folder, the heads a safetensors file with both runs' weights
    from safetensors.numpy import load_file
    from transformers import AutoModel
    assert AutoModel.from_pretrained(out / "backbone").config.num_hidden_layers == 2
    keys = load_file(out / "heads.safetensors")
    assert any(k.startswith("run0.") for k in keys) and any(k.startswith("run1.") for k in keys)

    # the ONNX model, through avb predict, gives what the PyTorch path gives (different lengths, both cropped
    # and padded clips; the branch member attends over frames)
    wavs = val_wavs(predict_world, 6)
    onnx_rows = Predictor.load(out).predict(wavs).records()
    torch_rows = Predictor.load(exported["ens"], model=predict_world["model"]).predict(wavs).records()
    compare(onnx_rows, torch_rows, ONNX_TOL)
    # and both are the ensemble's own Val predictions (from the cached features)
    from helpers import TOL, run_val_predictions
    ens_val = run_val_predictions(exported["ens"])
    for wav, row in zip(wavs, onnx_rows):
        got = row_values({k: str(v) for k, v in row.items()})
        for name in AVB.names:
            np.testing.assert_allclose(got[name], ens_val[wav.stem][name], atol=TOL)


def test_a_single_run_exports_and_its_graph_takes_any_batch_and_length(predict_world, tmp_path):
    out = tmp_path / "run-export"
    result = invoke("export", "--heads", predict_world["runs"]["chain"], "--model", predict_world["model"],
                    "--out", out, "--check-audio", val_wavs(predict_world, 2)[0], "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["kind"] == "run" and config["parity"]["inputs"] != "generated"
    predictor = Predictor.load(out)
    torch_predictor = Predictor.load(predict_world["runs"]["chain"], model=predict_world["model"])
    rng = np.random.default_rng(3)
    for n, seconds in ((1, 0.4), (5, 3.3)):        # lengths and batch sizes the export never saw
        waves = [(0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32) for _ in range(n)]
        a = predictor.predict(waves, batch_size=n)
        b = torch_predictor.predict(waves, batch_size=n)
        for name in AVB.names:
            np.testing.assert_allclose(a.values[name], b.values[name], atol=ONNX_TOL)


def test_predict_model_dir_runs_where_torch_cannot_be_imported(predict_world, exported, tmp_path):
    wavs = val_wavs(predict_world, 3)
    onnx_csv, torch_csv = tmp_path / "onnx.csv", tmp_path / "torch.csv"
    code = NO_TORCH + ("from extract.app.cli import main\n"
                       f"main(['predict', '--model-dir', {str(exported['out'])!r}, '--out', {str(onnx_csv)!r}, "
                       f"'--quiet', *{[str(w) for w in wavs]!r}])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" not in proc.stderr
    result = invoke("predict", *wavs, "--heads", exported["ens"], "--model", predict_world["model"], "--out",
                    torch_csv, "--quiet")
    assert result.exit_code == 0, result.output
    compare(read_csv(onnx_csv)[1], read_csv(torch_csv)[1], ONNX_TOL)
    # the torch block works: the PyTorch path fails under it
    code = NO_TORCH + "import extract.serve.model\n"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr


def test_the_model_card_has_hub_front_matter_val_intervals_and_an_example_that_runs(predict_world, exported,
                                                                                    tmp_path):
    card = (exported["out"] / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "other" and "onnx" in front["tags"] and front["metrics"] == ["ccc", "uar"]
    # Val scores: the ensemble's own metrics.json figures, each with an interval around it
    metrics = json.loads((exported["ens"] / "metrics.json").read_text())
    table = re.findall(r"^\| (\S+) \| (-?[0-9.]+) \| (-?[0-9.]+) – (-?[0-9.]+) \|$", card, re.M)
    rows = {key: (value, low, high) for key, value, low, high in table}
    assert set(rows) >= {"type_uar", "two_ccc", "high_ccc", "culture_ccc", "mean"}
    for key, (value, low, high) in rows.items():
        assert abs(float(value) - metrics[key]) < 1e-4, key
        assert float(low) <= float(value) <= float(high), key
    assert "run-vanilla × 0.5" in card and "run-branch × 0.5" in card

    # the example: at most 25 lines, numpy + soundfile + onnxruntime only, and it prints what avb predict gives
    example = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert example.strip() == EXAMPLE.format(clip_seconds=2.5).strip() and len(example.strip().splitlines()) <= 25
    wav = val_wavs(predict_world, 2)[0]
    (tmp_path / "clip.wav").write_bytes(wav.read_bytes())
    for name in ("model.onnx", "config.json"):
        (tmp_path / name).write_bytes((exported["out"] / name).read_bytes())
    proc = subprocess.run([sys.executable, "-c", NO_TORCH + example], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()}  # noqa: S307
    want = Predictor.load(exported["out"]).predict([wav]).records()[0]
    for task, values in printed.items():
        for column, value in values.items():
            assert abs(value - want[column]) <= 1e-3, (task, column)   # the example rounds to 3 decimals


def test_export_refuses_a_mismatched_backbone_an_existing_out_and_a_newer_folder(predict_world, exported, tmp_path):
    other = make_tiny_backbone(tmp_path / "wider", hidden_size=48, intermediate_size=64)
    run = predict_world["runs"]["vanilla"]
    result = invoke("export", "--heads", run, "--model", other, "--out", tmp_path / "x")
    assert result.exit_code != 0 and last_line(result).endswith(
        "layer hidden_0 is 32-d in its cache and 48-d in the model")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))

    result = invoke("export", "--heads", run, "--model", predict_world["model"], "--out", exported["out"])
    assert last_line(result) == f"Error: --out {exported['out']} already exists; give a new folder or --overwrite"

    newer = tmp_path / "newer"
    newer.mkdir()
    for path in exported["out"].iterdir():
        if path.is_file():
            (newer / path.name).write_bytes(path.read_bytes())
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "export_format": EXPORT_FORMAT + 1}))
    wav = val_wavs(predict_world, 2)[0]
    result = invoke("predict", wav, "--model-dir", newer, "--out", tmp_path / "p.csv")
    assert last_line(result) == (f"Error: {newer / 'config.json'}: export_format {EXPORT_FORMAT + 1} is newer than "
                                 f"this avb-heads reads ({EXPORT_FORMAT}); upgrade avb-heads to run it")
    result = invoke("predict", wav, "--model-dir", run, "--out", tmp_path / "p.csv")
    assert last_line(result).startswith(f"Error: --model-dir {run}: not a folder written by avb export")
    result = invoke("predict", wav, "--model-dir", exported["out"], "--heads", run, "--out", tmp_path / "p.csv")
    assert last_line(result).startswith("Error: give exactly one of --heads")
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------------------------- windows

def long_recording(path, seconds: float, rate: int = 16000, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.2 * np.sin(2 * np.pi * (150 + 40 * np.sin(t)) * t) * (0.5 + 0.5 * np.sin(0.7 * t))
    wave += 0.02 * rng.standard_normal(len(t))
    soundfile.write(str(path), wave, rate, subtype="PCM_16")
    return path


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_windows_of_a_long_recording_equal_the_same_samples_predicted_as_clips(predict_world, exported, tmp_path,
                                                                              engine):
    path = long_recording(tmp_path / "long.wav", 9.3)
    predictor = (Predictor.load(exported["out"]) if engine == "onnx"
                 else Predictor.load(exported["ens"], model=predict_world["model"]))
    preds = predictor.predict([path], window=2.5, hop=1.25, batch_size=4)
    # 9.3 s, windows of 2.5 s every 1.25 s: starts 0, 1.25, ..., 6.25 and a last one at 7.5 (1.8 s, padded)
    starts = [r["start_s"] for r in preds.window_records()]
    assert starts == [1.25 * k for k in range(7)]
    assert preds.window_records()[-1]["end_s"] == pytest.approx(9.3)
    wave = load_audio(path, max_seconds=60)
    clips = [wave[int(s * 16000):int(s * 16000) + 40000] for s in starts]
    alone = predictor.predict(clips)          # the same samples, each an in-memory clip
    for name in AVB.names:
        np.testing.assert_allclose(preds.window_values[name], alone.values[name], atol=1e-5)
        np.testing.assert_allclose(preds.values[name][0], alone.values[name].mean(axis=0), atol=1e-12)
    record = preds.records()[0]
    probs = [record[f"p_{c}"] for c in AVB["type"].classes]
    assert record["Voc_Type"] == AVB["type"].classes[int(np.argmax(probs))]


def test_predict_cli_windows_write_two_files_and_say_once_when_a_file_is_short(predict_world, exported, tmp_path):
    long = long_recording(tmp_path / "long.flac", 70.0)        # over the 60 s whole-clip limit
    short = long_recording(tmp_path / "short.wav", 1.0, seed=1)
    out = tmp_path / "pred.csv"
    result = invoke("predict", long, "--model-dir", exported["out"], "--out", out, "--quiet")
    assert result.exit_code != 0
    assert last_line(result) == (f"Error: {long}: 70.0 s long; whole-clip prediction reads recordings up to 60 s "
                                 "(the first 2.5 s of each); use --window 2.5 --hop 1.25 for long recordings")
    result = invoke("predict", long, short, "--model-dir", exported["out"], "--out", out, "--window", "2.5",
                    "--hop", "1.25", "--quiet")
    assert result.exit_code == 0, result.output
    header, rows = read_csv(tmp_path / "pred.windows.csv")
    assert header[:3] == ["path", "start_s", "end_s"]
    assert len(rows) == 55 + 1                                  # 1 + ceil((70 - 2.5) / 1.25), and one for short
    assert result.output.count("shorter than the 2.5 s window") == 1
    _, per_file = read_csv(out)
    assert [r["path"] for r in per_file] == [str(long), str(short)]
    for bad, message in (("0", "--hop must be > 0"), ("3", "--hop must be > 0 and at most --window")):
        result = invoke("predict", short, "--model-dir", exported["out"], "--out", out, "--window", "2.5", "--hop",
                        bad, "--quiet")
        assert result.exit_code != 0 and message in last_line(result), last_line(result)


def test_flac_and_ogg_give_the_predictions_of_the_same_audio_in_wav(exported, tmp_path):
    rng = np.random.default_rng(7)
    t = np.arange(int(2.2 * 44100)) / 44100
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(np.pi * t / 2.2) + 0.01 * rng.standard_normal(len(t))
    wave = np.round(wave * 32767).astype(np.int16)   # integers: libsndfile rounds floats per format differently
    paths = {}
    for fmt, subtype in (("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")):
        paths[fmt] = tmp_path / f"clip.{fmt}"
        soundfile.write(str(paths[fmt]), wave, 44100, subtype=subtype)
    preds = Predictor.load(exported["out"]).predict([paths["wav"], paths["flac"], paths["ogg"]])
    for name in AVB.names:
        values = preds.values[name]
        np.testing.assert_array_equal(values[0], values[1])            # FLAC is lossless: the same samples
        # Vorbis is lossy (about 30 dB SNR at its default quality on this signal): close, the same class
        np.testing.assert_allclose(values[2], values[0], atol=2e-2)
    assert len({r["Voc_Type"] for r in preds.records()}) == 1


def test_the_python_api_takes_arrays_at_any_rate_like_files(exported, tmp_path):
    rng = np.random.default_rng(4)
    at_48k = (0.2 * rng.standard_normal((48000 * 2, 2))).astype(np.float32)     # stereo, 48 kHz
    path = tmp_path / "clip.wav"
    soundfile.write(str(path), at_48k, 48000, subtype="FLOAT")
    predictor = Predictor.load(exported["out"])
    mono_16k = load_audio(path)
    preds = predictor.predict([path, mono_16k, (at_48k, 48000)])
    assert preds.names == [str(path), "array_1", "array_2"]
    for name in AVB.names:       # the same samples whichever way they come in
        np.testing.assert_array_equal(preds.values[name][1], preds.values[name][0])
        np.testing.assert_array_equal(preds.values[name][2], preds.values[name][0])
    with pytest.raises(Exception, match="input 0: expected a float waveform"):
        predictor.predict([np.zeros((2, 2, 2))])


def test_an_undecodable_file_is_named_in_one_line_and_skip_bad_leaves_it_out(predict_world, exported, tmp_path):
    good = val_wavs(predict_world, 2)[0]
    bad = tmp_path / "noise.ogg"
    bad.write_bytes(b"OggS" + bytes(range(256)) * 4)          # an Ogg page header, then garbage
    out = tmp_path / "p.csv"
    result = invoke("predict", good, bad, "--model-dir", exported["out"], "--out", out, "--quiet")
    assert result.exit_code != 0 and last_line(result).startswith(f"Error: {bad}: not a readable audio file (")
    assert not out.exists()
    result = invoke("predict", good, bad, "--model-dir", exported["out"], "--out", out, "--quiet", "--skip-bad",
                    "--window", "2.5")
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in read_csv(out)[1]] == [str(good)]
    assert {r["path"] for r in read_csv(tmp_path / "p.windows.csv")[1]} == {str(good)}


def test_export_without_the_extra_says_which_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)           # `import onnx` raises ImportError
    result = invoke("export", "--heads", tmp_path, "--out", tmp_path / "x")
    assert last_line(result) == "Error: avb export needs onnx: pip install 'avb-heads[export]'"
