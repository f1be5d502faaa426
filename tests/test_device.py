"""Where the heads run: --device resolution and errors, the code paths accelerators take (run here on the CPU),
bf16 autocast, the gradient buffers, and the grid spread over two `accelerate launch` processes."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from grids import grid_config
from helpers import (
    DIMS,
    accelerate_command,
    cfg_of,
    make_inputs,
    make_signal_cache,
    make_targets,
)

from cache.reader import load_cache
from extract.app.cli import main as avb
from heads.model.architectures import HeadConfig, build_head
from heads.tasks import AVB
from heads.training import joint as train_mod
from heads.training.device import DeviceError, autocast, resolve_device
from heads.training.joint import TrainConfig, TrainingError, train_runs

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
HEAD = HeadConfig(hidden=16, n_heads=2, branch_blocks=2)
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("cache") / "signal.h5", sizes=(96, 48, 24))


# ------------------------------------------------------------------------------------------- resolution

def test_auto_and_cpu_resolve_and_unknown_devices_are_refused():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^unknown device 'gpu0'; expected auto \(CUDA if available, else CPU\), "
                                          r"cpu, cuda, cuda:N or mps$"):
        resolve_device("gpu0")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error_naming_cuda():
    with pytest.raises(DeviceError, match=r"^device 'cuda': CUDA is not available \(.+, torch .+\)$"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"^device 'cuda:1': CUDA is not available"):
        resolve_device("cuda:1")


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_a_cuda_index_beyond_the_devices_is_refused():
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"^device 'cuda:{n}': CUDA has {n} device\(s\)"):
        resolve_device(f"cuda:{n}")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["heads", "train", "--out", "RUN"], ["heads", "ablate", "--out", "RUN"]])
def test_cli_device_cuda_without_cuda_exits_1_with_one_line(cache_file, tmp_path, command):
    args = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    result = CliRunner().invoke(avb, [*args, "--cache", str(cache_file), "--device", "cuda", "--no-progress"])
    why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: device 'cuda': CUDA is not available ({why}, torch {torch.__version__})"]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- accelerator paths on the CPU

def test_epoch_end_loss_check_of_accelerators_names_run_epoch_and_task(cache_file, tmp_path, monkeypatch):
    """Off the CPU a non-finite loss is found from the epoch's sums (no per-step host read): same message."""
    cache = load_cache(cache_file)
    real = train_mod.task_losses
    calls = []

    def poisoned(tasks, outputs, targets):
        losses = real(tasks, outputs, targets)
        calls.append(1)
        if len(calls) == 3:  # third step of epoch 1, run 1, task high
            losses = losses.clone()
            losses[1, 2] = float("nan")
        return losses

    monkeypatch.setattr(train_mod, "task_losses", poisoned)
    real_init = train_mod.JointTraining.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.check_each_step = False   # what a CUDA device gets

    monkeypatch.setattr(train_mod.JointTraining, "__init__", init)
    cfgs = [TrainConfig(arch="vanilla", weighting="uniform", seed=s, epochs=2, head=HEAD) for s in (0, 1)]
    with pytest.raises(TrainingError) as err:
        train_runs(cache, cfgs, [tmp_path / "a", tmp_path / "b"], progress=False)
    assert str(err.value) == ("run vanilla-uniform-s1, epoch 1: high loss is nan; training stopped (check the "
                              "features and labels, or lower the learning rate)")
    assert len(calls) == 96 // 8      # the whole epoch ran, then the check
    assert not (tmp_path / "a" / "metrics.json").exists()


def test_bf16_autocast_trains_finite_runs_with_float32_state(cache_file, tmp_path):
    cache = load_cache(cache_file)
    cfgs = [TrainConfig(arch=arch, weighting="rruw", seed=0, epochs=2, head=HEAD, precision="bf16")
            for arch in ("vanilla",)]
    m = train_runs(cache, cfgs, [tmp_path / "bf16"], progress=False)[0]
    assert all(np.isfinite(m[k]) for k in AVB.metric_keys)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    with pytest.raises(TrainingError, match=r"^unknown precision 'fp8'; expected one of fp32, bf16$"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("variant", ["vanilla", "chain", "branch", "branch_frames"])
def test_bf16_autocast_forward_and_backward_of_every_head(variant):
    head = build_head(cfg_of(variant), DIMS, [3, 7], AVB).train()
    head.use_grad_buffers()
    with autocast(torch.device("cpu"), "bf16"):
        out = head(make_inputs(2), make_targets(2))
        loss = sum(v.float().sum() for v in out.values())
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("variant", ["vanilla_weighted", "chain", "branch", "branch_frames"])
def test_gradient_buffers_give_autograd_gradients_step_after_step(variant):
    plain, buffered = (build_head(cfg_of(variant, dropout=0.0), DIMS, [3, 7], AVB).train() for _ in range(2))
    buffered.use_grad_buffers()
    for step in range(2):
        x, tg = make_inputs(2, seed=step), make_targets(2, seed=step)
        for head in (plain, buffered):
            head.zero_grad(set_to_none=True)
            sum((v * torch.linspace(-1, 1, v.shape[-1])).sum() for v in head(x, tg).values()).backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), buffered.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the grid over processes

def _launch(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [*accelerate_command("heads.ablate", processes), *args]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cwd), "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False)


def _prediction_bytes(grid: Path) -> dict[str, bytes]:
    return {str(p.relative_to(grid)): p.read_bytes() for p in sorted(grid.glob("*/predictions/*/*.csv"))}


@pytest.mark.slow
def test_grid_on_two_accelerate_processes_equals_one_process(cache_file, tmp_path):
    from heads.training.grid import run_grid

    grid = ["--cache", str(cache_file), "--archs", "vanilla,branch", "--weightings", "uniform,dwa,rruw",
            "--seeds", "0", "--epochs", "2", "--hidden", "16", "--n-heads", "2", "--branch-blocks", "2",
            "--max-group-mib", "0", "--no-progress"]
    one = tmp_path / "one"
    torch_threads = torch.get_num_threads()
    run_grid(grid_config(cache_file, archs=("vanilla", "branch"), weightings=("uniform", "dwa", "rruw"), seeds=(0,),
                         epochs=2, head=HEAD, max_group_bytes=0), one, progress=False)
    assert torch.get_num_threads() == torch_threads
    two = tmp_path / "two"
    proc = _launch([*grid, "--out", str(two)], 2, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("| Model |") == 1                  # one table, printed by process 0
    assert (two / "results.csv").read_text() == (one / "results.csv").read_text()
    assert _prediction_bytes(two) == _prediction_bytes(one) and len(_prediction_bytes(one)) == 6 * 10
    trained_on = {name: json.loads((two / name / "metrics.json").read_text())["trained_on"]
                  for name in ("vanilla-uniform-s0", "branch-uniform-s0")}
    # whole groups per process, the costlier (BRANCH) first: each process trained one architecture
    assert trained_on == {"branch-uniform-s0": {"device": "cpu (1 threads)", "process": "0 of 2"},
                          "vanilla-uniform-s0": {"device": "cpu (1 threads)", "process": "1 of 2"}}
    assert "process" not in json.loads((one / "vanilla-uniform-s0" / "metrics.json").read_text())["trained_on"]
    assert not list(two.glob(".training-*.json"))
    before = {p: p.stat().st_mtime_ns for p in two.glob("*/metrics.json")}
    # a grown grid on two processes trains only the new runs
    proc = _launch([*grid[:7], "0,1", *grid[8:], "--out", str(two)], 2, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with open(two / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    with open(one / "results.csv", encoding="utf-8") as f:
        assert [r for r in rows if r["seed"] == "0"] == list(csv.DictReader(f))


def test_groups_are_split_over_processes_longest_first_onto_the_least_loaded():
    from heads.training.distributed import assign_groups

    # costs 8, 8, 8, 8 (groups 1, 4, 5, 6) then 1, 1, 1 (0, 2, 3); worked by hand, ties to the lower rank
    assert assign_groups([1, 8, 1, 1, 8, 8, 8], 2) == [[0, 1, 3, 5], [2, 4, 6]]
    assert assign_groups([3, 1, 2], 1) == [[0, 1, 2]]
    assert assign_groups([5], 3) == [[0], [], []]


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_predict_device_cuda_without_cuda_fails_before_loading_anything(tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")
    result = CliRunner().invoke(avb, ["predict", "--model", str(tmp_path / "no-model"), "--heads",
                                      str(tmp_path / "no-heads"), "--out", str(tmp_path / "p.csv"),
                                      "--device", "cuda", "--quiet", str(wav)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: device 'cuda': CUDA is not available (")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()
