"""The stacked optimiser and schedule: every run follows torch's AdamW + clip_grad_norm_ + ReduceLROnPlateau on
its own rows, through torch's public fused kernel where it works and the plain-tensor update where it does not."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from heads.model import optim
from heads.model.optim import PlateauHalving, PlateauStateError, StackedAdamW

torch.set_num_threads(1)


def _loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(w * x) + 0.5 * (w * x) ** 2).sum()


def test_stacked_adamw_equals_torch_adamw_for_one_run():
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(1, 6, 4, generator=g), torch.randn(1, 4, generator=g)
    ours = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    ref = [w0[0].clone().requires_grad_(), b0[0].clone().requires_grad_()]
    opt = StackedAdamW(ours, n_runs=1, lr=3e-2, weight_decay=0.01, max_grad_norm=None)
    ref_opt = torch.optim.AdamW(ref, lr=3e-2, weight_decay=0.01)
    for _ in range(12):
        x = torch.randn(6, 4, generator=g)
        opt.zero_grad()
        ref_opt.zero_grad()
        (_loss(ours[0][0], x) + _loss(ours[1][0], x[0])).backward()
        (_loss(ref[0], x) + _loss(ref[1], x[0])).backward()
        opt.step()
        ref_opt.step()
    assert torch.allclose(ours[0][0], ref[0], atol=1e-6, rtol=0)
    assert torch.allclose(ours[1][0], ref[1], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[0][0], w0[0], atol=1e-3)  # it did move


def test_stacked_adamw_runs_are_independent_with_their_own_lr_and_clipping():
    """Each slice follows torch AdamW + clip_grad_norm_ at its own lr; a huge gradient in run 1 changes nothing
    for runs 0 and 2. A group covering only runs [1, 2] (a weighting module) uses those runs' rates."""
    g = torch.Generator().manual_seed(1)
    lrs = [1e-2, 5e-2, 2e-3]
    scale = [1.0, 1e4, 1.0]                       # run 1's gradients are enormous: clipping must be per run
    w0, a0 = torch.randn(3, 5, generator=g), torch.randn(2, 4, generator=g)
    w = w0.clone().requires_grad_()
    a = a0.clone().requires_grad_()               # leading dim 2 = runs 1 and 2
    opt = StackedAdamW([{"params": [w]}, {"params": [a], "runs": [1, 2], "weight_decay": 0.0}],
                       n_runs=3, lr=lrs, weight_decay=0.01, max_grad_norm=1.0)
    refs = []
    for r in range(3):
        pw = w0[r].clone().requires_grad_()
        pa = [a0[r - 1].clone().requires_grad_()] if r >= 1 else []
        groups = [{"params": [pw], "weight_decay": 0.01}] + ([{"params": pa, "weight_decay": 0.0}] if pa else [])
        refs.append((pw, pa, torch.optim.AdamW(groups, lr=lrs[r])))
    for _ in range(8):
        x = torch.randn(5, generator=g)
        opt.zero_grad()
        total = sum(scale[r] * _loss(w[r], x) for r in range(3)) + sum(
            scale[r] * _loss(a[r - 1], x[:4]) for r in (1, 2))
        total.backward()
        opt.step()
        for r, (pw, pa, ref_opt) in enumerate(refs):
            ref_opt.zero_grad()
            loss = scale[r] * _loss(pw, x) + (scale[r] * _loss(pa[0], x[:4]) if pa else 0.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([pw, *pa], max_norm=1.0)
            ref_opt.step()
    for r, (pw, pa, _) in enumerate(refs):
        assert torch.allclose(w[r], pw, atol=1e-6, rtol=0), r
        if pa:
            assert torch.allclose(a[r - 1], pa[0], atol=1e-6, rtol=0), r


def test_plateau_halving_matches_reduce_lr_on_plateau():
    rng = np.random.default_rng(3)
    runs = [
        np.concatenate([np.linspace(0.1, 0.5, 5), np.full(20, 0.4), np.linspace(0.5, 0.6, 5)]),  # long plateau
        rng.uniform(0, 1, 30),                                                                   # noise
        np.linspace(-0.5, 0.2, 30),                                                              # always better
    ]
    params = [torch.zeros(3, 1, requires_grad=True)]
    opt = StackedAdamW(params, n_runs=3, lr=1e-3)
    sched = PlateauHalving(opt, patience=5, factor=0.5)
    refs = []
    for _ in runs:
        ref_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
        refs.append((ref_opt, torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="max", factor=0.5,
                                                                          patience=5)))
    n_reduced = 0
    for epoch in range(30):
        reduced = sched.step([seq[epoch] for seq in runs])
        n_reduced += int(reduced.sum())
        for r, (ref_opt, ref_sched) in enumerate(refs):
            ref_sched.step(runs[r][epoch])
            assert opt.lr[r].item() == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), (r, epoch)
    assert n_reduced >= 3                     # the plateau run was halved more than once
    assert opt.lr[2].item() == 1e-3           # the always-improving run never was


def test_a_cut_to_some_runs_keeps_their_rates_and_plateau_counts():
    """keep_runs (a pruned search trial leaves its stack): the kept runs' schedules go on as torch's would."""
    rng = np.random.default_rng(3)
    runs = [np.concatenate([np.linspace(0.1, 0.5, 5), np.full(25, 0.4)]), rng.uniform(0, 1, 30),
            np.linspace(-0.5, 0.2, 30)]
    param = torch.zeros(3, 1, requires_grad=True)
    opt = StackedAdamW([param], n_runs=3, lr=[1e-3, 2e-3, 3e-3])
    sched = PlateauHalving(opt, patience=3, factor=0.5)
    refs = []
    for lr in (1e-3, 2e-3, 3e-3):
        ref_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
        refs.append((ref_opt, torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="max", factor=0.5,
                                                                          patience=3)))
    alive = [0, 1, 2]
    for epoch in range(30):
        if epoch == 7:   # run 0 is 2 epochs into its plateau: its count must survive the cut
            param.data = param.data[[0, 2]]
            opt.keep_runs([0, 2])
            sched.keep_runs([0, 2])
            alive = [0, 2]
        sched.step([runs[r][epoch] for r in alive])
        for i, r in enumerate(alive):
            ref_opt, ref_sched = refs[r]
            ref_sched.step(runs[r][epoch])
            assert opt.lr[i].item() == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), (r, epoch)
    assert opt.n_runs == 2 and opt.lr[0].item() <= 1e-3 / 4 and opt.lr[1].item() == 3e-3   # halved; never


@pytest.mark.parametrize("sync_free, fused", [(False, True), (True, True), (True, False)],
                         ids=["cpu-path", "cuda-path", "plain-path"])
def test_fused_stacked_adamw_with_mixed_rates_and_clipping_equals_torch_per_run(sync_free, fused):
    """Rates equal in runs 0 and 2 but not 1 (non-contiguous groups), a plateau-style rate change midway, and
    clipping that hits some runs and not others: every run still follows clip_grad_norm_ + torch AdamW, on the
    CPU's path (clipping folded into the kernel), on the one CUDA takes (no host read) and on the plain-tensor update
    of devices without the fused kernel (one rate per row in one pass), all run here on the CPU."""
    g = torch.Generator().manual_seed(5)
    n_runs = 4
    lrs = [1e-2, 3e-2, 1e-2, 5e-3]
    scale = [1.0, 300.0, 1.0, 50.0]
    w0, b0 = torch.randn(n_runs, 6, 3, generator=g), torch.randn(n_runs, 3, generator=g)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = StackedAdamW([w, b], n_runs=n_runs, lr=lrs, weight_decay=0.01, max_grad_norm=2.0, sync_free=sync_free,
                       fused=fused)
    refs = []
    for r in range(n_runs):
        pw, pb = w0[r].clone().requires_grad_(), b0[r].clone().requires_grad_()
        refs.append((pw, pb, torch.optim.AdamW([pw, pb], lr=lrs[r], weight_decay=0.01)))
    for step in range(10):
        if step == 5:                     # a schedule halves run 2's rate: runs 0 and 2 part ways
            opt.lr[2] *= 0.5
            refs[2][2].param_groups[0]["lr"] *= 0.5
        x = torch.randn(6, 3, generator=g)
        sum(scale[r] * (_loss(w[r], x) + _loss(b[r], x[0])) for r in range(n_runs)).backward()
        opt.step()
        opt.zero_grad()
        for r, (pw, pb, ref) in enumerate(refs):
            ref.zero_grad()
            (scale[r] * (_loss(pw, x) + _loss(pb, x[0]))).backward()
            torch.nn.utils.clip_grad_norm_([pw, pb], 2.0)
            ref.step()
    assert bool((opt.last_grad_norms[[1, 3]] > 2.0).all())   # clipping was active for the scaled runs
    for r, (pw, pb, _) in enumerate(refs):
        torch.testing.assert_close(w[r], pw, rtol=0, atol=2e-6)
        torch.testing.assert_close(b[r], pb, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------- no private torch API

def test_the_optimiser_calls_only_torchs_public_api():
    source = Path(optim.__file__).read_text()
    assert re.findall(r"torch\._[a-z]", source) == []


def _train_against_torch(opt_kwargs: dict, steps: int = 6) -> StackedAdamW:
    """Two runs at their own rates and a clipping limit that bites for run 1, stepped `steps` times; asserts that
    each run's rows equal torch.optim.AdamW + clip_grad_norm_ on that run alone."""
    g = torch.Generator().manual_seed(11)
    lrs, scale = [2e-2, 7e-3], [1.0, 100.0]
    w0 = torch.randn(2, 5, 3, generator=g)
    w = w0.clone().requires_grad_()
    opt = StackedAdamW([w], n_runs=2, lr=lrs, weight_decay=0.05, max_grad_norm=1.0, **opt_kwargs)
    refs = [(p := w0[r].clone().requires_grad_(), torch.optim.AdamW([p], lr=lrs[r], weight_decay=0.05,
                                                                     foreach=False)) for r in range(2)]
    for _ in range(steps):
        x = torch.randn(5, 3, generator=g)
        sum(scale[r] * _loss(w[r], x) for r in range(2)).backward()
        opt.step()
        opt.zero_grad()
        for r, (p, ref) in enumerate(refs):
            ref.zero_grad()
            (scale[r] * _loss(p, x)).backward()
            torch.nn.utils.clip_grad_norm_([p], 1.0)
            ref.step()
    for r, (p, _) in enumerate(refs):
        torch.testing.assert_close(w[r], p, rtol=0, atol=2e-6)
    return opt


def test_where_the_fused_kernel_fails_the_plain_update_takes_over_and_still_equals_torch_adamw(monkeypatch):
    """A torch whose fused AdamW raises (a device or version without the kernel): the probe says so once, the
    optimiser takes the plain-tensor update and still follows AdamW; asking for the kernel is a clear error."""
    real = optim.torch_adamw.adamw
    calls = []

    def no_fused_kernel(*args, fused=None, **kwargs):
        calls.append(fused)
        if fused:
            raise RuntimeError("fused=True requires all the params to be floating point Tensors of supported devices")
        return real(*args, fused=fused, **kwargs)

    monkeypatch.setattr(optim.torch_adamw, "adamw", no_fused_kernel)
    monkeypatch.setattr(optim, "_FUSED_WORKS", {})
    opt = _train_against_torch({})
    assert opt.fused is False and calls.count(True) == 1          # probed once, then never asked again
    assert optim.fused_adamw_works(torch.device("cpu"), torch.float32) is False
    with pytest.raises(ValueError, match=r"fused AdamW does not work for \['cpu torch.float32'\]"):
        StackedAdamW([torch.zeros(2, 3, requires_grad=True)], n_runs=2, lr=1e-3, fused=True)


def test_a_fused_kernel_that_takes_a_wrong_step_is_not_used(monkeypatch):
    """The probe reads its trial step back: a kernel that runs but does not take AdamW's first step (-lr·sign(g))
    is not trusted."""
    monkeypatch.setattr(optim.torch_adamw, "adamw", lambda *args, **kwargs: None)   # runs, changes nothing
    monkeypatch.setattr(optim, "_FUSED_WORKS", {})
    assert optim.fused_adamw_works(torch.device("cpu"), torch.float32) is False
    monkeypatch.undo()
    monkeypatch.setattr(optim, "_FUSED_WORKS", {})
    assert optim.fused_adamw_works(torch.device("cpu"), torch.float32) is True    # torch 2.4+ on the CPU
    assert _train_against_torch({}).fused is True


@pytest.mark.parametrize("state", [
    {"best": [0.5], "last_epoch": 3, "num_bad_epochs": 1, "mode": "max"},     # torch's ReduceLROnPlateau
    {"best": [0.5, 0.4], "num_bad_epochs": [1]},                               # runs disagree
    {"best": ["0.5", None], "num_bad_epochs": [1, 0]},                         # not a number
    {"best": [0.5, None], "num_bad_epochs": [1, -2]},                          # a negative count
], ids=["torch-state", "lengths", "text", "negative"])
def test_a_plateau_state_of_another_shape_is_a_clear_error(state):
    sched = PlateauHalving(StackedAdamW([torch.zeros(2, 1, requires_grad=True)], n_runs=2, lr=1e-3))
    with pytest.raises(PlateauStateError, match=r"^plateau schedule state .*: expected PlateauHalving.state_dict's "
                                                 r"\{'best': \[2 numbers or null\], 'num_bad_epochs': \[2 counts\]\}$"):
        sched.load_state_dict(state)
    sched.load_state_dict({"best": [0.5, None], "num_bad_epochs": [1, 0]})
    assert sched.best.tolist() == [0.5, -np.inf] and sched.num_bad_epochs.tolist() == [1, 0]
