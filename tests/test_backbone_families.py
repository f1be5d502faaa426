"""wav2vec2, HuBERT and WavLM through the whole stage-1 path: SpecAugment and attention masks as each family's
config says, fine-tuning, the dump, `avb cache info`, `avb predict` with heads trained on the cache, and
`avb predict` with the fine-tuned model's own head (end to end, no cache).

The end-to-end check is exact: predicting every Val clip with `--heads FT` and scoring the result against the
corpus reproduces the scores fine-tuning's own validation wrote for its best epoch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    NO_DROPOUT,
    TOL,
    S,
    conv_frames,
    mlflow_history,
    mlflow_runs,
    padded_batch,
    read_csv,
    row_values,
    run_val_predictions,
    wandb_offline_runs,
)
from tiny_model import make_tiny_backbone

from cache.reader import load_cache
from extract.app.cli import main as avb
from extract.backbone import forward_layers, load_backbone, uses_attention_mask
from extract.corpus import read_corpus
from extract.dump import DumpConfig, run_dump
from extract.finetune import FinetuneConfig, run_finetune
from extract.synth import synthesize_corpus
from heads.metrics import score_all
from heads.model.architectures import HeadConfig
from heads.runs import (
    CONFIG_FILE,
    RunDirError,
    find_runs,
    is_finetune_dir,
    read_run_config,
)
from heads.tasks import AVB, TYPE_CLASSES
from heads.training.joint import TrainConfig, train_runs

torch.set_num_threads(1)
FAMILIES = ("wav2vec2", "hubert", "wavlm")
NEW = ("hubert", "wavlm")


@pytest.mark.parametrize("family", NEW)
def test_spec_augment_is_set_on_each_familys_config_and_acts_only_in_training(tmp_path, family):
    path = make_tiny_backbone(tmp_path / family, family=family, **NO_DROPOUT)
    model = load_backbone(path, spec_time_p=0.2, spec_feature_p=0.1, mask_time_length=5, mask_feature_length=3)
    cfg = model.config
    assert cfg.model_type == family and type(model).__name__.lower().startswith(family)
    assert (cfg.apply_spec_augment, cfg.mask_time_prob, cfg.mask_time_length) == (True, 0.2, 5)
    assert (cfg.mask_feature_prob, cfg.mask_feature_length) == (0.1, 3)
    waves, mask = padded_batch([S, S], seed=4)
    with torch.no_grad():
        a, _, _ = forward_layers(model.eval(), waves, mask)
        b, _, _ = forward_layers(model, waves, mask)
        c, _, _ = forward_layers(model.train(), waves, mask)
    torch.testing.assert_close(a["hidden_2"], b["hidden_2"])
    torch.testing.assert_close(a["cnn"], c["cnn"])                 # masking acts after the CNN
    assert not torch.allclose(a["hidden_2"], c["hidden_2"], atol=1e-4)


@pytest.mark.parametrize("family", NEW)
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")  # WavLM's own attention
def test_attention_mask_follows_each_familys_feature_norm(tmp_path, family):
    group = load_backbone(make_tiny_backbone(tmp_path / "g", family=family)).eval()
    layer = load_backbone(make_tiny_backbone(tmp_path / "l", family=family, feat_extract_norm="layer",
                                             do_stable_layer_norm=True)).eval()
    assert not uses_attention_mask(group) and uses_attention_mask(layer)
    waves, mask = padded_batch([S, 12345])
    noisy = waves.clone()
    noisy[1, 12345:] = torch.randn(S - 12345)
    n = conv_frames(12345)
    with torch.no_grad():
        clean, n_frames, _ = forward_layers(layer, waves, mask)
        dirty, _, _ = forward_layers(layer, noisy, mask)
        direct = layer(waves[1:2], attention_mask=mask[1:2], output_hidden_states=True).hidden_states[2][0]
        pooled, _, _ = forward_layers(group, waves, mask)
        plain = group(waves[1:2], output_hidden_states=True).hidden_states[2][0]   # zero padding, no mask
    assert int(n_frames[1]) == n
    for name in clean:  # layer norm + mask: what lies in the padding does not matter
        torch.testing.assert_close(clean[name], dirty[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clean["hidden_2"][1], direct[:n].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled["hidden_2"][1], plain[:n].mean(0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- the whole stage 1

@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("families") / "corpus", 30, seed=8, min_seconds=0.6,
                             max_seconds=3.5, progress=False)


@pytest.fixture(scope="module", params=FAMILIES)
def pipeline(request, corpus_root, tmp_path_factory):
    """Fine-tune a tiny random model of the family (2 epochs, logging to every tracker: TensorBoard, offline W&B,
    MLflow), dump its best backbone, train a head on the cache."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pretrained = make_tiny_backbone(root / "pretrained", family=family)
    ft = root / "ft"
    run_finetune(FinetuneConfig(corpus=str(corpus_root), model=str(pretrained), out=str(ft), epochs=2, batch_size=4,
                                eval_batch_size=5, lr_backbone=1e-3, hidden=16, report_to="all"),
                 progress=False)
    cache = root / "cache.h5"
    run_dump(DumpConfig(corpus=str(corpus_root), model=str(ft / "backbone"), out=str(cache), batch_size=5),
             progress=False)
    run = root / "heads-run"
    train_runs(load_cache(cache), [TrainConfig(arch="vanilla", seed=1, epochs=2, head=HeadConfig(hidden=16))], [run],
               progress=False)
    return {"family": family, "root": root, "pretrained": pretrained, "ft": ft, "cache": cache, "run": run}


def val_wav_paths(corpus_root: Path) -> list[Path]:
    corpus = read_corpus(corpus_root)
    return [corpus.audio_path(corpus.ids[i]) for i in corpus.indices("Val")]


def predict(*args) -> object:
    return CliRunner().invoke(avb, ["predict", *map(str, args), "--quiet"])


def test_cache_info_names_the_backbone_type(pipeline):
    result = CliRunner().invoke(avb, ["cache", "info", str(pipeline["cache"])])
    assert result.exit_code == 0, result.output
    backbone_line = next(line for line in result.output.splitlines() if line.startswith("backbone:"))
    assert backbone_line.endswith(f"({pipeline['family']})") and str(pipeline["ft"] / "backbone") in backbone_line
    info = json.loads(CliRunner().invoke(avb, ["cache", "info", "--json", str(pipeline["cache"])]).output)
    assert info["backbone"]["model_type"] == pipeline["family"]
    assert info["layers"] == ["cnn", "hidden_0", "hidden_1", "hidden_2"]


def test_predict_with_heads_trained_on_the_cache_equals_their_cached_predictions(pipeline, corpus_root, tmp_path):
    wavs = val_wav_paths(corpus_root)[:5]
    out = tmp_path / "p.csv"
    result = predict(*wavs, "--model", pipeline["ft"] / "backbone", "--heads", pipeline["run"], "--out", out)
    assert result.exit_code == 0, result.output
    reference = run_val_predictions(pipeline["run"])
    for wav, row in zip(wavs, read_csv(out)[1]):
        for name, values in row_values(row).items():
            np.testing.assert_allclose(values, reference[wav.stem][name], atol=TOL, err_msg=f"{wav.name} {name}")


def test_predict_with_a_finetuning_output_uses_its_own_head_and_reproduces_its_val_scores(pipeline, corpus_root,
                                                                                         tmp_path):
    ft = pipeline["ft"]
    config = json.loads((ft / CONFIG_FILE).read_text())
    assert (config["kind"], config["finetune_format"]) == ("finetune", 1)
    wavs = val_wav_paths(corpus_root)
    out = tmp_path / "ft.csv"
    result = predict(*wavs, "--model", ft / "backbone", "--heads", ft, "--out", out)   # the documented form
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out)
    corpus = read_corpus(corpus_root)
    rows_of = {clip: i for i, clip in enumerate(corpus.ids)}
    order = [rows_of[Path(r["path"]).stem] for r in rows]
    labels = {name: corpus.labels[name][order] for name in AVB.names}
    preds = {name: np.array([row_values(r)[name] for r in rows]) for name in AVB.names}
    assert [r["Voc_Type"] for r in rows] == [TYPE_CLASSES[i] for i in preds["type"].argmax(1)]
    best = json.loads((ft / "metrics.json").read_text())["best"]["val"]
    got = score_all(AVB, labels, preds)
    for key, value in best.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    # --model may be left out (the output's own backbone) and gives the same file
    again = tmp_path / "again.csv"
    assert predict(*wavs, "--heads", ft, "--out", again).exit_code == 0
    assert again.read_text() == out.read_text()


def test_a_finetuning_output_refuses_another_backbone_and_is_not_taken_for_a_head_run(pipeline, corpus_root,
                                                                                      tmp_path):
    ft = pipeline["ft"]
    wav = val_wav_paths(corpus_root)[0]
    result = predict(wav, "--model", pipeline["pretrained"], "--heads", ft, "--out", tmp_path / "x.csv")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: --model {pipeline['pretrained']} is not the backbone fine-tuned together with the head of {ft} "
        f"(its weights differ from {ft / 'backbone'}); use --model {ft / 'backbone'} or leave --model out")
    copy = tmp_path / "copy"
    shutil.copytree(ft / "backbone", copy)                  # a copy of the same weights is fine
    assert predict(wav, "--model", copy, "--heads", ft, "--out", tmp_path / "y.csv").exit_code == 0
    result = predict(wav, "--heads", pipeline["run"], "--out", tmp_path / "z.csv")
    assert result.output.strip().splitlines()[-1].startswith("Error: --model is needed: the heads in ")
    with pytest.raises(RunDirError, match=r"a fine-tuning output \(avb finetune\), not a head run: predict with it"):
        find_runs([ft])


def test_a_finetuning_output_without_its_marker_is_not_taken_for_one(pipeline, tmp_path):
    """Version 0.1.0 has no released older fine-tuning format: a config.json without the marker is no
    fine-tuning output, and --heads says what it is missing instead of guessing from its fields."""
    unmarked = tmp_path / "unmarked"
    shutil.copytree(pipeline["ft"], unmarked, ignore=shutil.ignore_patterns("checkpoints", "tracking"))
    config = json.loads((unmarked / CONFIG_FILE).read_text())
    del config["kind"], config["finetune_format"]
    (unmarked / CONFIG_FILE).write_text(json.dumps(config))
    assert not is_finetune_dir(unmarked)
    with pytest.raises(RunDirError, match=r"config.json: written with no run_format"):
        read_run_config(unmarked)


def test_finetuning_logs_steps_and_epochs_to_tensorboard(pipeline, corpus_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = pipeline["ft"] / "tracking" / "finetune"
    events = EventAccumulator(str(logs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    metrics = json.loads((pipeline["ft"] / "metrics.json").read_text())
    history = metrics["history"]
    corpus = read_corpus(corpus_root)
    per_epoch = len(corpus.indices("Train")) // 4       # batch 4, drop_last (every synthetic clip is labelled)
    steps = history[-1]["step"]
    assert per_epoch >= 2 and steps == 2 * per_epoch
    for tag in ("train/loss", "train/loss_type", "loss_weight/culture", "lr/backbone", "lr/head"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, steps + 1)), tag
    assert all(e.value == pytest.approx(1e-3) for e in events.Scalars("lr/backbone"))
    assert all(e.value == pytest.approx(1.0) for e in events.Scalars("loss_weight/type"))   # uniform weighting
    assert {f"val/{k}" for k in history[0]["val"]} <= tags
    for key in ("type_uar", "high_ccc", "mean"):
        logged = events.Scalars(f"val/{key}")
        assert [e.step for e in logged] == [h["step"] for h in history]
        assert [e.value for e in logged] == pytest.approx([h["val"][key] for h in history], abs=1e-6)
    # per epoch the mean of the logged step losses is the epoch's train loss (1 process, no accumulation)
    losses = [e.value for e in events.Scalars("train/loss")]
    for epoch, h in enumerate(history):
        assert np.mean(losses[epoch * per_epoch:(epoch + 1) * per_epoch]) == pytest.approx(h["loss"], rel=1e-5)


def test_finetuning_logs_its_epochs_to_offline_wandb_and_to_the_local_mlflow_store(pipeline):
    """accelerate's W&B and MLflow trackers, as `avb finetune --report-to all` sets them up: an offline W&B run
    and the SQLite MLflow store in OUT/tracking, each read back with the package's own reader."""
    logs, history = pipeline["ft"] / "tracking", json.loads((pipeline["ft"] / "metrics.json").read_text())["history"]
    runs = mlflow_runs(logs, "finetune")
    assert list(runs) == ["ft"]
    want = [(h["step"], h["val"]["mean"]) for h in history]
    logged = mlflow_history(logs, runs["ft"], "val/mean")
    assert [s for s, _ in logged] == [s for s, _ in want]
    assert [v for _, v in logged] == pytest.approx([v for _, v in want], abs=1e-6)
    assert runs["ft"].data.params["lr_backbone"] == "0.001"
    wandb_runs = wandb_offline_runs(logs)
    assert list(wandb_runs) == ["ft"] and wandb_runs["ft"]["project"] == "finetune"
    logged = [(step, item["val/mean"]) for step, item in wandb_runs["ft"]["history"] if "val/mean" in item]
    assert [s for s, _ in logged] == [s for s, _ in want]
    assert [v for _, v in logged] == pytest.approx([v for _, v in want], abs=1e-6)
