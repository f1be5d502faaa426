"""Numerical safety: degenerate inputs stay finite, gradients are clipped, and a NaN stops a run with a clear error.

Already asserted elsewhere and not repeated here: 1 - CCC of constant predictions/targets and of one-row batches
(test_losses), single-class TYPE batches (test_losses), RRUW alpha at log alpha^2 = +-200 (test_weighting), DWA
with zero or non-finite epoch losses (test_weighting), per-run clipping equal to `clip_grad_norm_` (test_train),
CCC/Pearson of constant inputs (test_metrics), NaN features refused by `train_runs` and a poisoned loss in
epoch 2 (test_train), NaN/inf samples refused by `load_audio` and `ClipDataset` (test_audio, test_bad_input).
What is added: the same degenerate cases through whole training runs, DRUW at its alpha bounds, what a huge
gradient does to the optimisers (heads and fine-tuning), real divergence, NaN labels and features through the
CLI, and silent or NaN audio through the backbone and the dump.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import conv_frames, make_signal_cache
from scipy.io import wavfile
from tiny_model import make_tiny_backbone

from cache.reader import load_cache
from extract.app.cli import main as avb
from extract.audio import SAMPLE_RATE, crop_or_pad, load_audio, write_wav
from extract.corpus import read_corpus
from heads.metrics import score_all
from heads.model.architectures import HeadConfig
from heads.model.optim import StackedAdamW
from heads.model.weighting import DRUWWeighting
from heads.names import WEIGHTINGS
from heads.submission import read_class_probs, read_submission
from heads.tasks import AVB
from heads.training.joint import TrainConfig, TrainingError, train_runs

torch.set_num_threads(1)

HEAD = HeadConfig(hidden=16, n_heads=2, branch_blocks=2)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("numerics") / "signal.h5", sizes=(64, 40, 16))


@pytest.fixture(scope="module")
def corpus_and_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    from extract.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("numerics_audio")
    corpus = synthesize_corpus(root / "corpus", 9, seed=4, max_seconds=1.0, progress=False)
    return corpus, make_tiny_backbone(root / "group"), make_tiny_backbone(root / "layer", feat_extract_norm="layer")


def _all_finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return bool(np.isfinite(obj))
    return True


def _read_predictions(run_dir: Path, split: str) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for path in sorted((run_dir / "predictions" / split).glob("A-VB-*.csv")):
        task, ids, values = read_submission(path, AVB)
        out[task.name] = (ids, np.asarray(values))
    out["type_probs"] = read_class_probs(run_dir / "predictions" / split / "type_probs.csv", AVB, AVB["type"])
    return out


# ------------------------------------------------------------------------------- degenerate training data

@pytest.mark.parametrize("case", ["constant_labels", "constant_features"])
def test_degenerate_train_split_trains_every_weighting_to_finite_outputs(cache_file, tmp_path, case):
    """Train labels all equal (one TYPE class, constant regression targets), or Train features all zero (so every
    prediction in a batch is the same): the losses, the four weightings and the saved outputs stay finite."""
    cache = load_cache(cache_file)
    train = cache.indices("Train")
    if case == "constant_labels":
        for name in AVB.names:
            cache.labels[name][train] = 3.0 if name == "type" else 0.5
    else:
        for layer in cache.pooled:
            cache.pooled[layer][train] = 0.0
    configs = [TrainConfig(arch="vanilla", weighting=w, seed=k, epochs=4, batch_size=8, head=HEAD)
               for k, w in enumerate(WEIGHTINGS)]
    dirs = [tmp_path / c.name for c in configs]
    results = train_runs(cache, configs, dirs, progress=False)
    val_ids = [str(i) for i in cache.ids[cache.indices("Val")]]
    for cfg, run_dir, metrics in zip(configs, dirs, results):
        assert _all_finite(metrics), cfg.name
        for epoch in metrics["history"]:
            assert np.isfinite(epoch["loss"]) and _all_finite(epoch["task_losses"]), (cfg.name, epoch)
            weights = np.array(list(epoch["weights"].values()))
            assert np.isfinite(weights).all() and (weights > 0).all(), (cfg.name, epoch["weights"])
        assert set(json.loads((run_dir / "metrics.json").read_text())) >= set(AVB.metric_keys)
        for task, (ids, values) in _read_predictions(run_dir, "val").items():
            assert ids == val_ids and np.isfinite(values).all(), (cfg.name, task)


@pytest.mark.parametrize("s_value", [-200.0, 200.0])
def test_druw_at_its_alpha_bounds_is_finite_after_dwa_starts(s_value):
    m = DRUWWeighting(1, 4)
    m.end_epoch(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    m.end_epoch(torch.tensor([[1e-12, 5.0, 1.0, 1e6]]))   # extreme loss ratios for the DWA part
    with torch.no_grad():
        m.log_alpha_sq.fill_(s_value)
    losses = torch.tensor([[0.0, 2.0, 1e3, 1.0]], requires_grad=True)
    total = m(losses)
    total.sum().backward()
    assert torch.isfinite(total).all() and torch.isfinite(m.log_alpha_sq.grad).all()
    assert torch.isfinite(losses.grad).all()
    weights = m.weights()
    bound = 1e-3 if s_value < 0 else 1e3
    lam = m.dwa.weights()
    torch.testing.assert_close(weights, lam + 1 / bound**2)   # eq. 6 with alpha clamped to its bound
    assert torch.isfinite(lam).all() and lam.sum().item() == pytest.approx(4.0, rel=1e-5)


# ------------------------------------------------------------------------------------ gradient clipping

@pytest.mark.parametrize("scale", [1e15, 1e30])
def test_huge_gradient_step_moves_heads_by_at_most_lr_and_does_not_poison_adam(scale):
    """Run 1 gets one gradient `scale` times too large (1e30: its square overflows float32), then ordinary
    gradients pointing the other way. With clipping its step stays <= lr and it then follows the new gradient
    like run 0; without clipping AdamW's moments keep it going the old way (1e15) or freeze it (1e30)."""
    lr = 1e-2

    def run(max_grad_norm):
        w = torch.zeros(2, 10, requires_grad=True)
        opt = StackedAdamW([w], n_runs=2, lr=lr, weight_decay=0.0, max_grad_norm=max_grad_norm)
        w.grad = torch.ones(2, 10)
        w.grad[1] *= scale
        opt.step()
        first = w.detach().clone()
        for _ in range(5):
            w.grad = -torch.ones(2, 10)
            opt.step()
        return first, w.detach() - first

    first, later = run(5.0)
    assert torch.isfinite(first).all() and torch.isfinite(later).all()
    assert first.abs().max().item() <= lr * (1 + 1e-6)
    # After the huge step run 1 responds to the new (negative) gradient: params go up by at least one lr.
    assert (later[1] >= lr).all() and (later[0] >= lr).all()
    _, unclipped = run(None)
    assert (unclipped[1] <= 0).all()   # the control: without clipping the huge step dominates AdamW's state


def _finetune_cfg(corpus: Path, model: Path, out: Path, **kw):
    from extract.finetune import FinetuneConfig

    return FinetuneConfig(corpus=str(corpus), model=str(model), out=str(out), epochs=1, batch_size=2,
                          eval_batch_size=4, clip_seconds=0.5, hidden=8, **kw)


@pytest.mark.parametrize("grad_clip", [5.0, 0.0])
def test_finetune_clips_a_huge_gradient(corpus_and_models, tmp_path, monkeypatch, grad_clip):
    """A loss 1e12 times too large in the first step: with --grad-clip 5 every entry of AdamW's second moment
    is <= (1 - beta2) * 5^2 after it (the global norm was 5); with clipping off it is ~1e21."""
    import heads.model.losses
    from extract.finetune import run_finetune

    corpus, model, _ = corpus_and_models
    real = heads.model.losses.task_losses
    monkeypatch.setattr(heads.model.losses, "task_losses", lambda k, o, t: real(k, o, t) * 1e12)
    out = tmp_path / "ft"
    run_finetune(_finetune_cfg(corpus, model, out, max_steps=1, grad_clip=grad_clip), progress=False)
    (ckpt,) = (out / "checkpoints").iterdir()
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    v_max = max(float(s["exp_avg_sq"].max()) for s in state.values())
    if grad_clip:
        assert 0 < v_max <= (1 - 0.999) * grad_clip**2 * (1 + 1e-4)
    else:
        assert v_max > 1e15
    from transformers import AutoModel

    before = AutoModel.from_pretrained(model).state_dict()
    after = AutoModel.from_pretrained(out / "backbone").state_dict()
    # AdamW's first step: at most lr (plus decay) per weight, whatever the gradient.
    for name, tensor in after.items():
        bound = 1e-5 * (1 + 0.01 * before[name].abs()) + 1e-7
        assert torch.all((tensor - before[name]).abs() <= bound), name


def test_finetune_stops_on_a_nan_loss_before_the_update(corpus_and_models, tmp_path, monkeypatch):
    import heads.model.losses
    from extract.finetune import FinetuneError, run_finetune

    corpus, model, _ = corpus_and_models
    real = heads.model.losses.task_losses
    monkeypatch.setattr(heads.model.losses, "task_losses", lambda k, o, t: real(k, o, t) * float("nan"))
    out = tmp_path / "ft"
    with pytest.raises(FinetuneError) as err:
        run_finetune(_finetune_cfg(corpus, model, out), progress=False)
    assert str(err.value) == ("epoch 1, step 1: gradient norm is nan; training stopped before the update "
                              "(check the audio and labels, or lower the learning rates)")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]   # no weights, metrics or checkpoint


# ------------------------------------------------------------------------- NaN in, clear error out (heads)

def test_diverging_heads_run_stops_with_a_clear_error_and_writes_no_outputs(cache_file, tmp_path):
    """No monkeypatching: a learning rate of 1e6 really blows the head up within the first epoch."""
    cache = load_cache(cache_file)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train_runs(cache, [TrainConfig(lr=1e6, epochs=2, head=HEAD)], [run_dir], progress=False)
    message = str(err.value)
    assert message.startswith("run vanilla-uniform-s0, epoch 1: ") and " loss is nan; training stopped" in message
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_nan_labels_are_unknowns_not_errors(cache_file, tmp_path):
    """A NaN label is the project's 'unknown' (heads.metrics): Train NaNs leave the loss, Val NaNs leave the score."""
    cache = load_cache(cache_file)
    train, val = cache.indices("Train"), cache.indices("Val")
    cache.labels["two"][train[:5], 0] = np.nan
    cache.labels["type"][train[5:9]] = np.nan
    cache.labels["high"][val[:7]] = np.nan
    cache.labels["culture"][val[3], 2] = np.nan
    run_dir = tmp_path / "run"
    (metrics,) = train_runs(cache, [TrainConfig(epochs=2, head=HEAD)], [run_dir], progress=False)
    assert _all_finite(metrics)
    preds = _read_predictions(run_dir, "val")
    rows = {str(i): k for k, i in enumerate(cache.ids)}
    idx = np.array([rows[i] for i in preds["high"][0]])
    assert len(idx) == len(val) and all(np.isfinite(v).all() for _, v in preds.values())
    # Rescored from the CSVs on the labelled rows only (score_all drops rows with a NaN label of that task).
    rescored = score_all(AVB, {t: cache.labels[t][idx] for t in AVB.names}, {t: preds[t][1] for t in AVB.names})
    for key in (*AVB.metric_keys, "mean"):
        assert metrics[key] == pytest.approx(rescored[key], abs=1e-6), key
    keep = ~np.isnan(cache.labels["high"][idx]).any(1)
    assert keep.sum() == len(val) - 7


def test_nan_feature_in_a_cache_file_is_a_one_line_cli_error(cache_file, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(cache_file.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["pooled/hidden_2"][5, 3] = np.nan   # e.g. a cache edited or damaged outside the writer
    out = tmp_path / "run"
    res = CliRunner().invoke(avb, ["heads", "train", "--cache", str(bad), "--out", str(out), "--epochs", "2",
                                   "--hidden", "8", "--no-progress"])
    assert res.exit_code == 1
    assert res.output.strip() == (f"Error: {bad}, row 5 (File_ID [00005]), layer 'hidden_2': non-finite features "
                                  "(Train clip; 1 clip(s) in all)")
    assert not out.exists()


# ---------------------------------------------------------------------------------------- silent/NaN audio

def test_all_zero_audio_gives_finite_features_through_load_crop_and_forward(corpus_and_models, tmp_path):
    from extract.backbone import forward_layers, load_backbone

    _, group_dir, layer_dir = corpus_and_models
    path = tmp_path / "silence.wav"
    write_wav(path, np.zeros(int(0.7 * SAMPLE_RATE)))
    wave = load_audio(path)
    assert wave.dtype == np.float32 and not wave.any()
    clip, mask = crop_or_pad(wave, 16000)
    waves, masks = torch.from_numpy(np.stack([clip, clip])), torch.from_numpy(np.stack([mask, mask]))
    for model_dir in (group_dir, layer_dir):   # group norm sees var 0 over the clip; layer norm over the frame
        model = load_backbone(model_dir).eval()
        with torch.no_grad():
            pooled, n_frames, frames = forward_layers(model, waves, masks, frame_layers=["cnn", "hidden_2"])
        assert set(pooled) == {"cnn", "hidden_0", "hidden_1", "hidden_2"}
        for layer, value in pooled.items():
            assert torch.isfinite(value).all(), (model_dir.name, layer)
        assert all(torch.isfinite(f).all() for clips in frames.values() for f in clips)
        assert n_frames.tolist() == [conv_frames(len(wave))] * 2


def test_dump_of_a_silent_clip_is_finite_and_of_a_nan_clip_names_the_file(corpus_and_models, tmp_path):
    import shutil

    from extract.dump import DumpConfig, run_dump

    corpus, model, _ = corpus_and_models
    work = tmp_path / "corpus"
    shutil.copytree(corpus, work)
    ids = read_corpus(work).ids
    write_wav(work / "audio" / "wav" / f"{ids[2]}.wav", np.zeros(SAMPLE_RATE // 2))
    out = tmp_path / "silent.h5"
    run_dump(DumpConfig(corpus=str(work), model=str(model), out=str(out), batch_size=4), progress=False)
    cache = load_cache(out)
    assert cache.ids.tolist() == ids
    for layer, values in cache.pooled.items():
        assert np.isfinite(values.astype(np.float32)).all(), layer
    assert cache.n_frames[2] == conv_frames(SAMPLE_RATE // 2)

    samples = np.full(SAMPLE_RATE // 2, 0.1, dtype=np.float32)
    samples[5] = np.nan
    nan_wav = work / "audio" / "wav" / f"{ids[4]}.wav"
    wavfile.write(nan_wav, SAMPLE_RATE, samples)   # write_wav refuses non-finite samples
    out_dir = tmp_path / "nan"
    out_dir.mkdir()
    res = CliRunner().invoke(avb, ["dump", "--corpus", str(work), "--model", str(model), "--out",
                                   str(out_dir / "c.h5"), "--quiet"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: {nan_wav}: non-finite sample (NaN or inf) at frame 5"
    assert list(out_dir.iterdir()) == []   # neither the cache nor a shard nor a temporary file is left
