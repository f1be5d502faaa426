"""extract.finetune under real `accelerate launch` processes: learning, checkpoints, resume, best-epoch export."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import accelerate_launch, corpus_and_backbone
from safetensors.torch import load_file
from tiny_model import make_tiny_backbone

from extract.corpus import read_corpus
from extract.finetune import FinetuneConfig, finetune_command, latest_checkpoint
from extract.synth import synthesize_corpus
from heads.metrics import score_all
from heads.tasks import AVB

torch.set_num_threads(1)
S = 40000


def finetune(args: list[str], processes: int, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch [--multi_gpu --num_processes N] -m extract.finetune ...` for real (gloo on CPU)."""
    return accelerate_launch("extract.finetune", ["--quiet", *args], processes, cwd, timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    # The checkpoint asks for LayerDrop; load_backbone must switch it off, or layers would vanish from
    # hidden_states (transformers 5) and DDP would see unused parameters on some ranks.
    return (root, *corpus_and_backbone(root, 40, seed=5, max_seconds=3.0, layerdrop=0.3))


@pytest.fixture(scope="module")
def two_process_run(setup):
    """3 epochs x 3 steps with 2 processes, stopped by --max-steps 4 (mid-epoch 2), then --resume'd."""
    root, corpus, model = setup
    out = root / "run"
    common = ["--corpus", str(corpus), "--model", str(model), "--out", str(out), "--epochs", "3",
              "--batch-size", "2", "--lr-backbone", "1e-3", "--eval-batch-size", "3"]
    finetune(common + ["--max-steps", "4"], 2, root)
    first = json.loads((out / "metrics.json").read_text())
    stopped_at = latest_checkpoint(out / "checkpoints")
    state_at_stop = json.loads((stopped_at / "train_state.json").read_text())
    proc = finetune(common + ["--resume"], 2, root)
    return out, first, stopped_at, state_at_stop, proc


@pytest.mark.slow
def test_max_steps_stops_with_a_checkpoint_and_resume_continues(two_process_run):
    out, first, stopped_at, state_at_stop, proc = two_process_run
    # 14 fully labelled Train clips / (2 per process x 2 processes) = 3 steps per epoch.
    assert stopped_at.name == "step-00000004"
    assert (state_at_stop["step"], state_at_stop["epoch"], state_at_stop["batches_in_epoch"]) == (4, 1, 1)
    assert [(h["epoch"], h["step"], h["partial"]) for h in first["history"]] == [(1, 3, False), (2, 4, True)]
    assert "resuming from" in proc.stderr and "step 4" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(h["epoch"], h["step"], h["partial"]) for h in metrics["history"]] == [
        (1, 3, False), (2, 4, True), (2, 6, False), (3, 9, False)]
    assert metrics["history"][:2] == first["history"]
    final = latest_checkpoint(out / "checkpoints")
    state = json.loads((final / "train_state.json").read_text())
    assert (final.name, state["step"], state["epoch"], state["batches_in_epoch"]) == ("step-00000009", 9, 3, 0)
    # keep_checkpoints = 2, temporary folders gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000009"]
    assert {f"random_states_{r}.pkl" for r in (0, 1)} <= {p.name for p in final.iterdir()}


@pytest.mark.slow
def test_training_loss_decreases_and_history_is_logged(two_process_run):
    out = two_process_run[0]
    metrics = json.loads((out / "metrics.json").read_text())
    full = [h for h in metrics["history"] if not h["partial"]]
    assert full[-1]["loss"] < full[0]["loss"]
    for h in full:
        assert set(h["task_losses"]) == set(AVB.names) == set(h["weights"])
        assert h["weights"] == {t: 1.0 for t in AVB.names}  # uniform weighting
        # uniform weighting: the total is the plain sum of the task losses
        assert h["loss"] == pytest.approx(sum(h["task_losses"].values()), rel=1e-5)
        assert {"type_uar", "two_ccc", "high_ccc", "culture_ccc", "mean"} <= set(h["val"])
    best = metrics["best"]
    assert best["val"]["mean"] == max(h["val"]["mean"] for h in metrics["history"])
    config = json.loads((out / "config.json").read_text())
    assert (config["lr_head"], config["weighting"], config["processes"]) == (1e-3, "uniform", 2)
    assert config["head"]["arch"] == "vanilla" and config["layer_dims"]["hidden_2"] == 32


def _direct_val_scores(out: Path, corpus_root: Path) -> dict[str, float]:
    """Val metrics of OUT/backbone + OUT/head.safetensors, one clip at a time, without accelerate."""
    from transformers import AutoModel

    from extract.audio import crop_or_pad, load_audio
    from extract.backbone import forward_layers
    from heads.model.architectures import HeadConfig, HeadInputs, build_head

    config = json.loads((out / "config.json").read_text())
    backbone = AutoModel.from_pretrained(out / "backbone").eval()
    head = build_head(HeadConfig(**config["head"]), config["layer_dims"], seeds=[0], tasks=AVB)
    head.load_state_dict(load_file(str(out / "head.safetensors")))
    head.eval()
    corpus = read_corpus(corpus_root)
    rows = corpus.indices("Val")
    preds: dict[str, list] = {t: [] for t in AVB.names}
    with torch.no_grad():
        for row in rows:
            clip, mask = crop_or_pad(load_audio(corpus.audio_path(corpus.ids[row])), S)
            pooled, _, _ = forward_layers(backbone, torch.from_numpy(clip)[None], torch.from_numpy(mask)[None])
            outputs = head(HeadInputs(pooled={k: v[None] for k, v in pooled.items()}))
            for t in AVB.names:
                preds[t].append(outputs[t][0, 0].numpy())
    return score_all(AVB, {t: corpus.labels[t][rows] for t in AVB.names}, {t: np.stack(p) for t, p in preds.items()})


@pytest.mark.slow
def test_saved_backbone_is_the_best_epoch_and_val_metrics_match_a_direct_pass(setup, two_process_run):
    from transformers import AutoModel

    _, corpus_root, model_dir = setup
    out = two_process_run[0]
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best"]
    saved = AutoModel.from_pretrained(out / "backbone")
    assert saved.config.model_type == "wav2vec2"
    initial = AutoModel.from_pretrained(model_dir)
    key = "encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(saved.state_dict()[key], initial.state_dict()[key])  # it was trained

    # The exported weights are those of the best validation, bit for bit (checkpoint of that step).
    ckpt = out / "checkpoints" / f"step-{best['step']:08d}"
    if ckpt.exists():
        state = load_file(str(ckpt / "model.safetensors"))
        for name, tensor in saved.state_dict().items():
            assert torch.equal(tensor, state[f"backbone.{name}"]), name
        for name, tensor in load_file(str(out / "head.safetensors")).items():
            assert torch.equal(tensor, state[f"head.{name}"]), name

    # Validation ran with 2 processes and an eval batch (3) that does not divide Val: gather_for_metrics must
    # neither drop nor duplicate clips, so the logged metrics equal a one-clip-at-a-time pass without accelerate.
    direct = _direct_val_scores(out, corpus_root)
    assert direct.keys() == best["val"].keys()
    for k, v in direct.items():
        assert best["val"][k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.slow
def test_cli_refuses_to_clobber_or_resume_with_other_settings(setup, two_process_run):
    _, corpus_root, model_dir = setup
    out = two_process_run[0]
    runner = CliRunner()
    base = ["--corpus", str(corpus_root), "--model", str(model_dir), "--out", str(out), "--epochs", "3",
            "--batch-size", "2", "--lr-backbone", "1e-3"]
    res = runner.invoke(finetune_command, base)
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {out} already holds checkpoints (step-00000009); pass --resume to continue that run or choose "
        "another --out")
    res = runner.invoke(finetune_command, base + ["--resume", "--weighting", "dwa"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: --resume with weighting='dwa', but {out / 'config.json'} was trained with weighting='uniform'; "
        "use the same settings or another --out")


def test_cli_arch_and_weighting_are_case_insensitive(setup, two_process_run):
    _, corpus_root, model_dir = setup
    out = two_process_run[0]
    res = CliRunner().invoke(finetune_command, [
        "--corpus", str(corpus_root), "--model", str(model_dir), "--out", str(out), "--epochs", "3",
        "--batch-size", "2", "--lr-backbone", "1e-3", "--resume", "--arch", "Vanilla", "--weighting", "DWA"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (   # lower-cased before use; the arch matches the run's
        f"Error: --resume with weighting='dwa', but {out / 'config.json'} was trained with weighting='uniform'; "
        "use the same settings or another --out")


def test_config_defaults_are_the_papers():
    cfg = FinetuneConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr_backbone, cfg.lr_head) == (30, 8, 1e-5, 1e-3)
    assert (cfg.clip_seconds, cfg.spec_time_p, cfg.spec_feature_p) == (2.5, 0.05, 0.05)
    assert (cfg.plateau_patience, cfg.plateau_factor, cfg.arch, cfg.weighting) == (5, 0.5, "vanilla", "uniform")


def test_famo_is_refused_for_fine_tuning_in_one_line():
    from extract.finetune import FinetuneError

    with pytest.raises(FinetuneError, match=r"^--weighting famo measures every step with a second forward pass, "
                                            r"through the whole backbone here; it is for heads"):
        FinetuneConfig(corpus="corpus", out="out", weighting="famo").validate()


@pytest.mark.slow
def test_one_process_finetune_beats_chance_on_type(tmp_path):
    corpus_root = synthesize_corpus(tmp_path / "corpus", 96, seed=1, max_seconds=3.0, progress=False)
    model = make_tiny_backbone(tmp_path / "model")
    out = tmp_path / "run"
    # One process, no launcher: the command in-process (the 2-process runs above go through `accelerate launch`).
    res = CliRunner().invoke(finetune_command, [
        "--quiet", "--corpus", str(corpus_root), "--model", str(model), "--out", str(out), "--epochs", "10",
        "--batch-size", "8", "--lr-backbone", "1e-3", "--weighting", "dwa"])
    assert res.exit_code == 0, (res.output[-4000:], res.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    corpus = read_corpus(corpus_root)
    n_classes = len(np.unique(corpus.labels["type"][corpus.indices("Val"), 0]))
    chance = 1.0 / n_classes     # UAR of any constant prediction
    assert metrics["best"]["val"]["type_uar"] > 2 * chance
    # DWA: weights 1 for the first two epochs, then dynamic, always summing to K = 4.
    weights = [h["weights"] for h in metrics["history"]]
    assert weights[0] == weights[1] == {t: 1.0 for t in AVB.names}
    assert weights[2] != weights[1]
    for w in weights:
        assert sum(w.values()) == pytest.approx(4.0, rel=1e-5)


def test_clip_dataset_crops_are_seeded_per_epoch_and_row(setup):
    from extract.audio import load_audio
    from extract.clips import ClipDataset, EpochShuffleSampler, collate_clips

    _, corpus_root, _ = setup
    corpus = read_corpus(corpus_root)
    lengths = np.array([len(load_audio(corpus.audio_path(i))) for i in corpus.ids])
    long_row, short_row = int(np.argmax(lengths)), int(np.argmin(lengths))
    assert lengths[long_row] > S > lengths[short_row]
    rows = [long_row, short_row]
    train = ClipDataset(corpus, rows, train=True, seed=3)
    wave = load_audio(corpus.audio_path(corpus.ids[long_row]))

    def start_of(clip: torch.Tensor) -> int:  # where in the file the window was cut
        starts = [s for s in range(len(wave) - S + 1) if np.array_equal(wave[s:s + S], clip.numpy())]
        assert len(starts) >= 1
        return starts[0]

    epoch0 = [start_of(train[0]["wave"]) for _ in range(2)]
    assert epoch0[0] == epoch0[1]                                   # reproducible
    train.set_epoch(1)
    assert start_of(train[0]["wave"]) != epoch0[0]                  # a new crop each epoch
    again = ClipDataset(corpus, [short_row, long_row], train=True, seed=3)
    again.set_epoch(1)
    assert start_of(again[1]["wave"]) == start_of(train[0]["wave"])  # depends on the row, not the position
    evaluation = ClipDataset(corpus, rows)
    assert start_of(evaluation[0]["wave"]) == 0

    batch = collate_clips([evaluation[0], evaluation[1]])
    assert batch["waves"].shape == batch["mask"].shape == (2, S)
    assert batch["mask"].sum(1).tolist() == [S, lengths[short_row]]
    assert batch["rows"].tolist() == rows
    assert {t: tuple(v.shape) for t, v in batch["labels"].items()} == {
        "type": (2, 1), "two": (2, 2), "high": (2, 10), "culture": (2, 40)}
    np.testing.assert_array_equal(batch["labels"]["high"].numpy(), corpus.labels["high"][rows])

    sampler = EpochShuffleSampler(10, seed=4)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_plateau_state_survives_a_json_round_trip():
    from extract.finetune import GroupPlateau

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, GroupPlateau(opt, factor=0.5, patience=2)

    opt, sched = make()
    for score in (0.5, 0.4, 0.4):
        sched.step(score)
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    opt2, sched2 = make()
    sched2.load_state_dict(saved)
    for s in (sched, sched2):
        s.step(0.3)   # third epoch without improvement > patience 2: halve
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == 0.5
    fresh = json.loads(json.dumps(make()[1].state_dict(), allow_nan=False))
    assert fresh["best"] == [None]   # -inf is stored as null, the file stays strict JSON


def test_plateau_matches_torch_on_every_group():
    """GroupPlateau = torch's ReduceLROnPlateau(mode="max") over all parameter groups."""
    from extract.finetune import GroupPlateau

    def groups():
        return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-5},
                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}]

    opt, ref_opt = torch.optim.AdamW(groups()), torch.optim.AdamW(groups())
    sched = GroupPlateau(opt, factor=0.5, patience=2)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="max", factor=0.5, patience=2)
    scores = [0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, float("-inf")] + [0.1] * 40
    for k, score in enumerate(scores):
        sched.step(score)
        ref.step(score)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups], k
    assert opt.param_groups[0]["lr"] < 1e-5 / 4 and opt.param_groups[1]["lr"] < 1e-3 / 4
