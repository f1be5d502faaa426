"""Joint training of stacked head runs from a cache: optimiser, schedule, selection, outputs, determinism."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SPLIT_SIZES, make_signal_cache
from safetensors.torch import load_file

from cache.reader import load_cache
from heads.metrics import score_all
from heads.model.architectures import HeadConfig, HeadInputs, build_head
from heads.submission import read_class_probs, read_submission
from heads.tasks import AVB
from heads.training import inputs
from heads.training import joint as train_mod
from heads.training.joint import TrainConfig, TrainingError, train_runs

torch.set_num_threads(1)

SMALL_HEAD = HeadConfig(hidden=32, n_heads=4, branch_blocks=2)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("cache") / "signal.h5")


@pytest.fixture(scope="module")
def cache(cache_file):
    return load_cache(cache_file)


def _cfg(arch="vanilla", weighting="uniform", seed=0, epochs=3, head=SMALL_HEAD, **kw) -> TrainConfig:
    return TrainConfig(arch=arch, weighting=weighting, seed=seed, epochs=epochs, head=head, **kw)


def _rescore_val(run_dir: Path, cache) -> dict[str, float]:
    """Score a run's saved Val CSVs independently of the trainer (read back from disk)."""
    rows = {str(i): k for k, i in enumerate(cache.ids)}
    preds, labels = {}, {}
    for path in sorted((run_dir / "predictions" / "val").glob("A-VB-*.csv")):
        task, ids, values = read_submission(path, AVB)
        idx = np.array([rows[i] for i in ids])
        preds[task.name] = values
        labels[task.name] = cache.labels[task.name][idx]
    return score_all(AVB, labels, preds)


# ------------------------------------------------------------------------------------------- training

def assert_each_equals_alone(cache, configs, results, tmp_path, history=("loss", "weights")) -> None:
    """Each run of a joint call ends as the same run trained alone: scores, best epoch, the history's `history`
    fields (float32 rounding: 1e-5)."""
    for cfg, together in zip(configs, results):
        alone = train_runs(cache, [cfg], [tmp_path / "alone" / cfg.name], progress=False)[0]
        for key in (*AVB.metric_keys, "mean"):
            assert together[key] == pytest.approx(alone[key], abs=1e-5), (cfg.name, key)
        assert together["best_epoch"] == alone["best_epoch"], cfg.name
        assert len(together["history"]) == len(alone["history"]), cfg.name
        for h_joint, h_alone in zip(together["history"], alone["history"]):
            for field in history:
                assert h_joint[field] == pytest.approx(h_alone[field], abs=1e-5), (cfg.name, field)



def test_joint_training_equals_each_run_alone(cache, tmp_path):
    configs = [_cfg("chain", "uniform", 0), _cfg("chain", "dwa", 1), _cfg("chain", "druw", 2)]
    joint = train_runs(cache, configs, [tmp_path / "joint" / c.name for c in configs], progress=False)
    assert_each_equals_alone(cache, configs, joint, tmp_path)
    # the runs differ from each other (different seeds / weightings really were used)
    assert len({round(m["mean"], 6) for m in joint}) == 3


def test_the_added_weightings_and_druws_balance_train_jointly_as_alone(cache, tmp_path):
    """UW, RLW (random weights from each run's own generator), GLS and DRUW with beta = 0.5, in one stack."""
    configs = [_cfg("vanilla", "uw", 0, epochs=2), _cfg("vanilla", "rlw", 1, epochs=2),
               _cfg("vanilla", "gls", 2, epochs=2), _cfg("vanilla", "druw", 3, epochs=2,
                                                         weighting_options={"beta": 0.5})]
    joint = train_runs(cache, configs, [tmp_path / "joint" / c.name for c in configs], progress=False)
    assert_each_equals_alone(cache, configs, joint, tmp_path)
    rlw = [h["weights"] for h in joint[1]["history"]]
    assert rlw[0] != rlw[1] and sum(rlw[0].values()) == pytest.approx(4.0)   # redrawn: K * softmax


def test_famo_measures_each_step_without_moving_anyones_dropout_and_trains_jointly_as_alone(cache, tmp_path):
    """FAMO sees each batch again after the step (CHAIN's teacher forcing on, dropout off): in one stack with
    a uniform run, both end as alone, so the extra forward drew no dropout mask of either."""
    head = dataclasses.replace(SMALL_HEAD, dropout=0.3)
    configs = [_cfg("chain", "famo", 0, epochs=2, head=head), _cfg("chain", "uniform", 1, epochs=2, head=head)]
    joint = train_runs(cache, configs, [tmp_path / "joint" / c.name for c in configs], progress=False)
    assert_each_equals_alone(cache, configs, joint, tmp_path)
    famo = [h["weights"] for h in joint[0]["history"]]
    assert famo[0] != famo[1] and sum(famo[1].values()) == pytest.approx(4.0)   # K z / (c L): they sum to K


def test_runs_dropped_after_an_epoch_leave_the_stack_and_the_others_train_on_as_alone(cache, tmp_path,
                                                                                       monkeypatch):
    """A search's pruned trials leave the stack (`drop`): the model, each weighting (one losing all its runs),
    the optimiser's moments and the schedule are cut to the kept runs, which end as they would alone."""
    def cfg(weighting, seed, dropout=SMALL_HEAD.dropout, **kw):
        return _cfg("vanilla", weighting, seed, head=dataclasses.replace(SMALL_HEAD, dropout=dropout), **kw)

    configs = [cfg("dwa", 0, 0.1), cfg("rruw", 1), cfg("rlw", 2, 0.3, lr=3e-3), cfg("druw", 3),
               cfg("druw", 4, lr=2e-3)]
    dropped = {configs[1].name, configs[3].name}
    cut = []
    real_keep = train_mod.JointTraining.keep_runs

    def keep_runs(job, keep):
        real_keep(job, keep)
        model_group, *weighting_groups = job.optimizer.groups
        cut.append(({p.shape[0] for p in job.model.parameters()},
                    {job.optimizer.state[p]["exp_avg"].shape[0] for p in model_group.params},
                    [(g.run_list, [job.optimizer.state[p]["exp_avg"].shape[0] for p in g.params])
                     for g in weighting_groups],
                    [(runs, module.name) for runs, module in job.weightings]))

    monkeypatch.setattr(train_mod.JointTraining, "keep_runs", keep_runs)
    reported: list[tuple[int, str]] = []
    dirs = [tmp_path / "joint" / c.name for c in configs]
    joint = train_runs(cache, configs, dirs, progress=False, tracker=lambda name, epoch, _: reported.append(
        (epoch, name)), drop=lambda epoch: dropped if epoch == 1 else set())
    # 3 runs left: the model's rows and moments, DRUW's alpha (1 of its 2 runs), RRUW's module and group gone
    assert cut == [({3}, {3}, [([2], [1])], [([0], "dwa"), ([1], "rlw"), ([2], "druw")])]
    assert sorted(n for e, n in reported if e > 1) == sorted([configs[0].name, configs[2].name,
                                                              configs[4].name] * 2)
    for cfg, out, together in zip(configs, dirs, joint):
        if cfg.name in dropped:
            assert together is None and not (out / "metrics.json").exists()
    kept = [(cfg, m) for cfg, m in zip(configs, joint) if cfg.name not in dropped]
    assert_each_equals_alone(cache, *zip(*kept), tmp_path, history=("loss", "weights", "lr"))


def test_same_seed_gives_identical_files(cache, tmp_path):
    cfg = _cfg("vanilla", "rruw", seed=7, epochs=2)
    for name in ("a", "b"):
        train_runs(cache, [cfg], [tmp_path / name], progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"metrics.json", "config.json", "head.safetensors",
                                        "predictions/val/type_probs.csv", "predictions/test/A-VB-High_avb_1.csv"}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    other = train_runs(cache, [_cfg("vanilla", "rruw", seed=8, epochs=2)], [tmp_path / "c"], progress=False)[0]
    assert other["mean"] != json.loads((tmp_path / "a" / "metrics.json").read_text())["mean"]


def test_saved_outputs_are_the_best_epoch_not_the_last(tmp_path):
    """Val labels follow the negated relation: fitting Train makes Val worse, so the best epoch is early."""
    cache = load_cache(make_signal_cache(tmp_path / "inverted.h5", invert_val=True))
    cfg = _cfg("vanilla", "uniform", seed=0, epochs=5, lr=3e-3)
    out = tmp_path / "run"
    metrics = train_runs(cache, [cfg], [out], progress=False)[0]
    stored = json.loads((out / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(metrics))
    best, history = stored["best_epoch"], stored["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert best < 5
    assert max(h["val"]["mean"] for h in history) == history[best - 1]["val"]["mean"]
    # the files on disk score exactly what metrics.json says, which is the best epoch's score...
    rescored = _rescore_val(out, cache)
    for key in (*AVB.metric_keys, "mean"):
        assert rescored[key] == pytest.approx(stored[key], abs=1e-6), key
        assert stored[key] == pytest.approx(history[best - 1]["val"][key], abs=1e-9), key
    # ...and not the last epoch's
    assert abs(rescored["mean"] - history[-1]["val"]["mean"]) > 1e-3
    # the saved head is the best epoch's too: loading it reproduces the saved Val probabilities
    model = build_head(cfg.head, cache.layer_dims, [cfg.seed], AVB)
    model.load_run_state_dict(0, load_file(out / "head.safetensors"))
    model.eval()
    val = cache.indices("Val")
    with torch.no_grad():
        logits = model(HeadInputs(pooled={k: torch.from_numpy(v[val]).float()[None] for k, v in cache.pooled.items()}))
    ids, probs = read_class_probs(out / "predictions" / "val" / "type_probs.csv", AVB, AVB["type"])
    order = np.argsort(cache.ids[val])
    assert ids == list(cache.ids[val][order])
    assert np.allclose(probs, torch.softmax(logits["type"][0], -1).numpy()[order], atol=1e-6)


def test_outputs_cover_val_and_test_ids_and_config(cache, cache_file, tmp_path):
    cfg = _cfg("vanilla", "dwa", seed=0, epochs=2)
    train_runs(cache, [cfg], [tmp_path], progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["arch"], config["weighting"], config["seed"], config["epochs"]) == ("vanilla", "dwa", 0, 2)
    assert config["head"]["hidden"] == 32 and config["head"]["arch"] == "vanilla"
    assert config["cache"] == str(Path(cache_file).resolve())
    assert config["cache_attrs"]["layers"] == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
    for split, n in (("val", SPLIT_SIZES[1]), ("test", SPLIT_SIZES[2])):
        names = sorted(p.name for p in (tmp_path / "predictions" / split).iterdir())
        assert names == ["A-VB-Culture_avb_1.csv", "A-VB-High_avb_1.csv", "A-VB-Two_avb_1.csv",
                         "A-VB-Type_avb_1.csv", "type_probs.csv"]
        task, ids, values = read_submission(tmp_path / "predictions" / split / "A-VB-Culture_avb_1.csv", AVB)
        assert values.shape == (n, 40) and ids == sorted(cache.ids[cache.indices(split.title())].tolist())
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert set(history[0]) == {"epoch", "step", "partial", "loss", "task_losses", "weights", "lr", "val"}
    assert list(history[0]["weights"]) == list(AVB.names)
    assert history[0]["weights"] == {t: 1.0 for t in AVB.names}   # DWA: weight 1 in the first two epochs
    assert history[0]["lr"] == {"head": 1e-3}
    assert [h["partial"] for h in history] == [False, False]
    assert history[0]["step"] > 0 and history[1]["step"] == 2 * history[0]["step"]   # optimiser steps so far


@pytest.mark.parametrize("arch", ["vanilla", "chain", "branch"])
def test_every_arch_and_weighting_learns_the_signal(cache, tmp_path, arch):
    configs = [_cfg(arch, w, seed=0, epochs=4) for w in ("uniform", "dwa", "rruw", "druw")]
    results = train_runs(cache, configs, [tmp_path / c.name for c in configs], progress=False)
    for cfg, m in zip(configs, results):
        assert m["type_uar"] > 0.3, (cfg.name, m["type_uar"])           # chance is 1/8
        for key in ("two_ccc", "high_ccc", "culture_ccc"):
            assert m[key] > 0.3, (cfg.name, key, m[key])


def test_branch_over_frames_pads_masks_and_learns(tmp_path):
    from cache.reader import FrameReader

    path = make_signal_cache(tmp_path / "frames.h5", frames=True, sizes=(200, 120, 40))
    cache = load_cache(path)
    head = HeadConfig(hidden=32, n_heads=4, branch_blocks=2, branch_use_frames=True)
    cfg = TrainConfig(arch="branch", weighting="uniform", epochs=3, head=head)
    with FrameReader(path) as frames:
        # the batch tensors: zero-padded to the longest clip, mask = valid frames
        model = build_head(cfg.head, cache.layer_dims, [0], AVB)
        feats = inputs.Features(cache, model.required_layers, frames, model.required_frame_layers)
        rows = np.array([0, 1, 2])
        x = feats.shared(rows)      # shared by every run: a run dim of 1 that the head broadcasts
        lengths = cache.n_frames[rows]
        assert x.frame_mask.shape == (1, 3, lengths.max())
        assert x.frame_mask[0].sum(1).tolist() == lengths.tolist()
        first = frames.get(rows)["hidden_2"][0]
        assert torch.equal(x.frames["hidden_2"][0, 0, :len(first)], torch.from_numpy(first))
        assert float(x.frames["hidden_2"][0, 0, len(first):].abs().sum()) == 0.0
        m = train_runs(cache, [cfg], [tmp_path / "run"], progress=False, frames=frames)[0]
    assert m["type_uar"] > 0.25 and m["two_ccc"] > 0.3


# ------------------------------------------------------------------------------------------- errors

def test_nan_features_are_refused_before_training(cache_file, tmp_path):
    cache = load_cache(cache_file)
    cache.pooled["hidden_2"][5, 3] = np.nan
    with pytest.raises(TrainingError) as err:
        train_runs(cache, [_cfg()], [tmp_path / "run"], progress=False)
    assert str(err.value) == (f"{cache_file}, row 5 (File_ID [00005]), layer 'hidden_2': non-finite features "
                              "(Train clip; 1 clip(s) in all)")
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_run_epoch_and_task(cache, tmp_path, monkeypatch):
    real = train_mod.task_losses
    calls = {"n": 0}

    def poisoned(tasks, outputs, targets):
        losses = real(tasks, outputs, targets)
        calls["n"] += 1
        if calls["n"] > 40:  # inside epoch 2 (38 batches per epoch: 37 of 8 rows, one of 4)
            losses = losses.clone()
            losses[1, 2] = float("nan")
        return losses

    monkeypatch.setattr(train_mod, "task_losses", poisoned)
    configs = [_cfg(weighting="uniform", seed=0), _cfg(weighting="dwa", seed=1)]
    dirs = [tmp_path / c.name for c in configs]
    with pytest.raises(TrainingError) as err:
        train_runs(cache, configs, dirs, progress=False)
    assert str(err.value).startswith("run vanilla-dwa-s1, epoch 2: high loss is nan; training stopped")
    for d in dirs:
        assert not (d / "metrics.json").exists() and not (d / "predictions").exists()


def test_configs_that_cannot_train_jointly_are_refused(cache, tmp_path):
    with pytest.raises(TrainingError, match="runs trained jointly must share epochs: vanilla-uniform-s0 has 3, "
                                            "vanilla-dwa-s0 has 4"):
        train_runs(cache, [_cfg(epochs=3), _cfg(weighting="dwa", epochs=4)], [tmp_path / "a", tmp_path / "b"],
                   progress=False)
    with pytest.raises(TrainingError, match="share arch"):
        train_runs(cache, [_cfg("vanilla"), _cfg("chain")], [tmp_path / "a", tmp_path / "b"], progress=False)
    with pytest.raises(TrainingError, match="2 configs but 1 output folders"):
        train_runs(cache, [_cfg(), _cfg(seed=1)], [tmp_path / "a"], progress=False)
    with pytest.raises(TrainingError, match="unknown loss weighting 'nope'"):
        train_runs(cache, [_cfg(weighting="nope")], [tmp_path / "a"], progress=False)


def test_config_round_trips_through_json():
    cfg = TrainConfig(arch="CHAIN", weighting="DRUW", seed=3, head=HeadConfig(chain_order=("two", "type", "high",
                                                                                            "culture")))
    assert cfg.arch == "chain" and cfg.head.arch == "chain" and cfg.weighting == "druw"
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.head.chain_order == ("two", "type", "high", "culture")
    assert TrainConfig().to_dict() | {"head": None} == {
        "arch": "vanilla", "weighting": "uniform", "seed": 0, "epochs": 30, "batch_size": 8, "lr": 1e-3,
        "weight_decay": 0.01, "patience": 5, "lr_factor": 0.5, "grad_clip": 5.0, "precision": "fp32",
        "head": None,
        "weighting_options": {}}
