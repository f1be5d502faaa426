"""Task losses against independent float64 numpy / hand-worked references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heads.model.losses import LossInputError, ccc_loss, task_losses, type_loss
from heads.tasks import AVB

torch.set_num_threads(1)


def np_population_ccc(t: np.ndarray, p: np.ndarray) -> float:
    t, p = t.astype(np.float64), p.astype(np.float64)
    cov = np.mean((t - t.mean()) * (p - p.mean()))
    return 2 * cov / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)


def test_ccc_loss_matches_numpy_population_ccc():
    rng = np.random.default_rng(0)
    target = rng.random((3, 16, 5))
    pred = 0.5 * target + 0.3 * rng.random((3, 16, 5)) + 0.1
    expected = np.array([1 - np.mean([np_population_ccc(target[r, :, j], pred[r, :, j]) for j in range(5)])
                         for r in range(3)])
    got64 = ccc_loss(torch.tensor(pred), torch.tensor(target))
    got32 = ccc_loss(torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    assert got64.shape == (3,)
    np.testing.assert_allclose(got64.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(got32.numpy(), expected, atol=1e-6)


def test_ccc_loss_hand_value():
    # t = (0, 1), p = (1, 0): means 0.5, variances 0.25, cov -0.25 -> CCC = -0.5 / 0.5 = -1 -> loss 2.
    t = torch.tensor([[[0.0], [1.0]]])
    p = torch.tensor([[[1.0], [0.0]]])
    assert ccc_loss(p, t).item() == pytest.approx(2.0, abs=1e-6)


def test_ccc_loss_perfect_prediction_is_exactly_zero_and_has_zero_gradient():
    target = torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(1))
    pred = target.clone().requires_grad_(True)
    loss = ccc_loss(pred, target)
    assert torch.equal(loss, torch.zeros(2))
    loss.sum().backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("case", ["const_pred", "const_target", "both_const_equal", "both_const_diff", "batch1"])
def test_ccc_loss_degenerate_batches_are_finite(case):
    g = torch.Generator().manual_seed(2)
    target = torch.rand(2, 6, 4, generator=g)
    pred = torch.rand(2, 6, 4, generator=g)
    if case == "const_pred":
        pred = torch.full_like(pred, 0.5)
    elif case == "const_target":
        target = torch.full_like(target, 0.3)
    elif case == "both_const_equal":
        pred = torch.full_like(pred, 0.4)
        target = torch.full_like(target, 0.4)
    elif case == "both_const_diff":
        pred = torch.full_like(pred, 0.4)
        target = torch.full_like(target, 0.7)
    else:
        pred, target = pred[:, :1], target[:, :1]
    pred = pred.clone().requires_grad_(True)
    loss = ccc_loss(pred, target)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    assert ((loss >= 0) & (loss <= 2 + 1e-6)).all()
    if case == "both_const_equal":
        assert torch.equal(loss, torch.zeros(2))
    if case in ("const_pred", "const_target", "both_const_diff"):
        # CCC is 0 whenever one side is constant (cov = 0) -> loss 1 up to eps.
        torch.testing.assert_close(loss, torch.ones(2), atol=1e-5, rtol=0)


def test_ccc_loss_masks_nan_targets_per_column():
    rng = np.random.default_rng(3)
    target = rng.random((1, 10, 2))
    pred = rng.random((1, 10, 2))
    target[0, [2, 5], 0] = np.nan
    target[0, 7, 1] = np.nan
    keep0, keep1 = ~np.isnan(target[0, :, 0]), ~np.isnan(target[0, :, 1])
    expected = 1 - 0.5 * (np_population_ccc(target[0, keep0, 0], pred[0, keep0, 0])
                          + np_population_ccc(target[0, keep1, 1], pred[0, keep1, 1]))
    got = ccc_loss(torch.tensor(pred), torch.tensor(target))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # A column with no known target leaves the column mean; a run with none at all scores 0.
    target[0, :, 1] = np.nan
    only0 = 1 - np_population_ccc(target[0, keep0, 0], pred[0, keep0, 0])
    assert ccc_loss(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(only0, abs=1e-6)
    assert ccc_loss(torch.tensor(pred), torch.full_like(torch.tensor(target), float("nan"))).item() == 0.0


def test_ccc_loss_shape_error():
    with pytest.raises(LossInputError, match=r"ccc_loss needs pred and target of equal shape \[..., B, k\], "
                                             r"got \(1, 4, 2\) and \(1, 4, 3\)"):
        ccc_loss(torch.zeros(1, 4, 2), torch.zeros(1, 4, 3))


def test_type_loss_matches_cross_entropy_per_run():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 8, generator=g)
    target = torch.randint(0, 8, (3, 5), generator=g)
    got = type_loss(logits, target)
    expected = torch.stack([F.cross_entropy(logits[r], target[r]) for r in range(3)])
    torch.testing.assert_close(got, expected)


def test_type_loss_hand_value_and_ignored_rows():
    # Uniform logits over 8 classes: CE = log 8 whatever the class.
    logits = torch.zeros(1, 2, 8)
    assert type_loss(logits, torch.tensor([[3, 7]])).item() == pytest.approx(math.log(8), abs=1e-6)
    # logits (2, 0, ..., 0), class 0: -log(e^2 / (e^2 + 7)); the ignored row does not count.
    logits = torch.zeros(1, 2, 8)
    logits[0, 0, 0] = 2.0
    expected = -math.log(math.exp(2) / (math.exp(2) + 7))
    assert type_loss(logits, torch.tensor([[0, -100]])).item() == pytest.approx(expected, abs=1e-6)
    assert type_loss(logits, torch.tensor([[-100, -100]])).item() == 0.0


def test_type_loss_single_class_batch_is_finite():
    logits = torch.randn(2, 4, 8, requires_grad=True)
    loss = type_loss(logits, torch.full((2, 4), 5))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()


def test_type_loss_rejects_out_of_range_class():
    with pytest.raises(LossInputError, match=r"^type target holds class index 9, outside 0..7$"):
        type_loss(torch.zeros(1, 2, 8), torch.tensor([[1, 9]]))


def _batch(r: int, b: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    outputs = {n: (torch.randn if AVB[n].is_classification else torch.rand)(r, b, AVB[n].out_dim, generator=g)
               for n in AVB.names}
    targets = {n: torch.rand(r, b, AVB[n].label_dim, generator=g) for n in AVB.names}
    targets["type"] = torch.randint(0, 8, (r, b, 1), generator=g).float()
    return outputs, targets


def test_task_losses_stacks_in_task_order():
    outputs, targets = _batch(2, 6)
    got = task_losses(AVB, outputs, targets)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got[:, 0], type_loss(outputs["type"], targets["type"].squeeze(-1).long()))
    for k, name in enumerate(AVB.names[1:], start=1):
        expected = [1 - np.mean([np_population_ccc(targets[name][r, :, j].numpy(), outputs[name][r, :, j].numpy())
                                 for j in range(AVB[name].out_dim)]) for r in range(2)]
        np.testing.assert_allclose(got[:, k].numpy(), expected, atol=1e-6)


def test_task_losses_shared_targets_and_nan_type():
    outputs, targets = _batch(2, 6)
    shared = {n: t[0] for n, t in targets.items()}  # [B, label_dim], the same for both runs
    shared["type"] = shared["type"].clone()
    shared["type"][1, 0] = float("nan")
    got = task_losses(AVB, outputs, shared)
    keep = torch.tensor([True, False, True, True, True, True])
    expected = torch.stack([F.cross_entropy(outputs["type"][r][keep], shared["type"][keep, 0].long())
                            for r in range(2)])
    torch.testing.assert_close(got[:, 0], expected)
    assert torch.isfinite(got).all()


def test_task_losses_errors_name_task_and_shapes():
    outputs, targets = _batch(1, 3)
    del targets["high"]
    with pytest.raises(LossInputError, match=r"^targets lack task 'high'; got type, two, culture$"):
        task_losses(AVB, outputs, targets)
    outputs, targets = _batch(1, 3)
    targets["two"] = torch.zeros(1, 3, 3)
    with pytest.raises(LossInputError, match=r"^target of task 'two' must be \[R, B, 2\] or \[B, 2\] to match "
                                             r"output \(1, 3, 2\), got \(1, 3, 3\)$"):
        task_losses(AVB, outputs, targets)
