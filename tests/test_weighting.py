"""Loss weightings against hand-computed values of the paper's eqs. 3-6."""
from __future__ import annotations

import math

import pytest
import torch

from heads.model.weighting import (
    WEIGHTINGS,
    DRUWWeighting,
    DWAWeighting,
    FAMOWeighting,
    GLSWeighting,
    RLWWeighting,
    RRUWWeighting,
    UniformWeighting,
    UWWeighting,
    WeightingError,
    build_weighting,
    weighting_options,
)

torch.set_num_threads(1)


def hand_dwa(prev: list[float], prev2: list[float], temperature: float = 2.0) -> list[float]:
    """Eq. 3 written out: K * exp(w_k / T) / sum_j exp(w_j / T), w_k = L_k(t-1) / L_k(t-2)."""
    e = [math.exp(a / b / temperature) for a, b in zip(prev, prev2)]
    return [len(e) * x / sum(e) for x in e]


def hand_rruw_regs(alphas: list[float], phi: float = 1.0) -> float:
    return sum(math.log(1 + a * a) for a in alphas) + abs(phi - sum(abs(math.log(a)) for a in alphas))


def set_alphas(m: RRUWWeighting, alphas: list[list[float]]) -> None:
    with torch.no_grad():
        m.log_alpha_sq.copy_(torch.log(torch.tensor(alphas, dtype=torch.float32) ** 2))


def descend(m, losses: list[float], opt: torch.optim.Optimizer, steps: int) -> None:
    """`steps` optimiser steps on the weighted total of the same task losses (one run)."""
    for _ in range(steps):
        opt.zero_grad()
        m(torch.tensor([losses])).sum().backward()
        opt.step()


def test_registry_and_build():
    assert list(WEIGHTINGS) == ["uniform", "dwa", "rruw", "druw", "uw", "rlw", "gls", "famo"]
    assert isinstance(build_weighting("DWA", 2, 4), DWAWeighting)
    m = build_weighting("druw", 3, 4, temperature=5.0, phi=2.0)
    assert isinstance(m, DRUWWeighting) and m.dwa.temperature == 5.0 and m.phi == 2.0
    assert weighting_options("rruw") == {"phi": 1.0, "alpha_init": 1.0, "alpha_min": 1e-3, "alpha_max": 1e3}
    assert weighting_options("dwa") == {"temperature": 2.0}


def test_build_errors_are_clear():
    with pytest.raises(WeightingError, match=r"^unknown loss weighting 'gradnorm'; expected one of "
                                             r"uniform, dwa, rruw, druw, uw, rlw, gls, famo$"):
        build_weighting("gradnorm", 1, 4)
    with pytest.raises(WeightingError, match=r"^loss weighting 'dwa' has no option 'phi'; its options: temperature$"):
        build_weighting("dwa", 1, 4, phi=1.0)
    with pytest.raises(WeightingError, match=r"^option temperature must be finite and > 0, got 0$"):
        build_weighting("dwa", 1, 4, temperature=0)
    with pytest.raises(WeightingError, match=r"alpha_min <= alpha_init <= alpha_max"):
        build_weighting("rruw", 1, 4, alpha_init=1e-5)
    with pytest.raises(WeightingError, match=r"^uniform weighting expects losses of shape \[2, 4\] \(runs, tasks\), "
                                             r"got \(4,\)$"):
        build_weighting("uniform", 2, 4)(torch.ones(4))


def test_uniform_sums_losses():
    m = UniformWeighting(2, 4)
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(m(losses), torch.tensor([10.0, 2.0]))
    torch.testing.assert_close(m.weights(), torch.ones(2, 4))


def test_dwa_first_two_epochs_are_one_then_eq3():
    m = DWAWeighting(1, 4)
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(m.weights(), torch.ones(1, 4))
    torch.testing.assert_close(m(losses), torch.tensor([10.0]))
    m.end_epoch(torch.tensor([[2.0, 2.0, 2.0, 2.0]]))          # epoch 0 done: epoch 1 still uses 1
    torch.testing.assert_close(m.weights(), torch.ones(1, 4))
    m.end_epoch(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))          # epoch 1 done: eq. 3 with w = (0.5, 1, 1.5, 2)
    lam = hand_dwa([1, 2, 3, 4], [2, 2, 2, 2])
    assert lam == pytest.approx([0.6612, 0.8490, 1.0901, 1.3997], abs=1e-3)  # the numbers worked by hand
    torch.testing.assert_close(m.weights(), torch.tensor([lam]))
    assert m.weights().sum().item() == pytest.approx(4.0, abs=1e-5)
    # eq. 4: total = sum_k lambda_k L_k
    assert m(losses).item() == pytest.approx(sum(l * x for l, x in zip(lam, [1, 2, 3, 4])), abs=1e-5)
    assert m.weights().requires_grad is False and m.lambdas.requires_grad is False
    m.end_epoch(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))          # the ratio uses the last two epochs only
    torch.testing.assert_close(m.weights(), torch.tensor([hand_dwa([1, 1, 1, 1], [1, 2, 3, 4])]))


def test_dwa_temperature_and_runs_get_their_own_lambdas():
    m = DWAWeighting(2, 3, temperature=0.5)
    m.end_epoch(torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    m.end_epoch(torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]]))
    expected = torch.tensor([hand_dwa([1, 2, 4], [2, 2, 2], 0.5), [1.0, 1.0, 1.0]])
    torch.testing.assert_close(m.weights(), expected)
    torch.testing.assert_close(m.weights().sum(-1), torch.tensor([3.0, 3.0]))
    losses = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    torch.testing.assert_close(m(losses), torch.tensor([3.0, 3.0]))


def test_dwa_zero_or_nonfinite_epoch_losses_stay_finite():
    m = DWAWeighting(2, 4)
    m.end_epoch(torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    m.end_epoch(torch.tensor([[0.5, 1.0, 1.0, 1.0], [float("nan"), float("inf"), 1.0, 1.0]]))
    w = m.weights()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.tensor([4.0, 4.0]))
    assert w[0, 0] > 3.99  # 0.5 / ~0 dominates the softmax


def test_rruw_total_matches_eq5_with_log1p_regulariser():
    alphas = [[0.5, 1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]]
    losses = [[0.3, 0.7, 1.2, 2.0], [1.0, 2.0, 3.0, 4.0]]
    m = RRUWWeighting(2, 4)
    set_alphas(m, alphas)
    expected = [sum(l / a**2 for l, a in zip(ls, al)) + hand_rruw_regs(al) for ls, al in zip(losses, alphas)]
    # run 0 by hand: 1.2 + 0.7 + 0.3 + 0.125 + log(1.25 * 2 * 5 * 17) + |1 - 4 log 2|
    assert expected[0] == pytest.approx(2.325 + math.log(212.5) + 4 * math.log(2) - 1, abs=1e-12)
    torch.testing.assert_close(m(torch.tensor(losses)), torch.tensor(expected))
    torch.testing.assert_close(m.weights(), 1 / torch.tensor(alphas) ** 2)
    torch.testing.assert_close(m.alphas(), torch.tensor(alphas))


def test_rruw_phi_option():
    m = RRUWWeighting(1, 2, phi=3.0)
    set_alphas(m, [[2.0, 0.5]])
    expected = 1 / 4 + 2 / 0.25 + math.log(5) + math.log(1.25) + abs(3 - 2 * math.log(2))
    assert m(torch.tensor([[1.0, 2.0]])).item() == pytest.approx(expected, abs=1e-5)


def test_rruw_gradient_matches_hand_derivative():
    # d total / d s_k with s = log alpha^2: -L_k e^{-s_k} + sigmoid(s_k) + d|phi - sum|s_j/2|| / d s_k
    alphas, losses = [0.5, 1.5, 2.0, 3.0], [0.3, 0.7, 1.2, 2.0]
    m = RRUWWeighting(1, 4)
    set_alphas(m, [alphas])
    m(torch.tensor([losses])).sum().backward()
    s = [2 * math.log(a) for a in alphas]
    outer = math.copysign(1.0, 1.0 - sum(abs(x) / 2 for x in s))
    expected = [-l * math.exp(-x) + 1 / (1 + math.exp(-x)) - outer * math.copysign(0.5, x) for l, x in zip(losses, s)]
    torch.testing.assert_close(m.log_alpha_sq.grad, torch.tensor([expected]))


def test_rruw_larger_loss_grows_alpha():
    m = RRUWWeighting(1, 2)
    descend(m, [5.0, 0.05], torch.optim.SGD(m.parameters(), lr=0.1), steps=5)
    a = m.alphas()[0]
    assert a[0] > 1.0 > a[1]
    w = m.weights()[0]
    assert w[0] < 1.0 < w[1]  # the hard (large-loss) task is down-weighted


@pytest.mark.parametrize("s_value", [-200.0, 200.0])
def test_rruw_extreme_alpha_is_clamped_finite_and_can_come_back(s_value):
    m = RRUWWeighting(1, 2)
    with torch.no_grad():
        m.log_alpha_sq.fill_(s_value)
    losses = torch.tensor([[1.0, 1.0]])
    total = m(losses)
    total.sum().backward()
    assert torch.isfinite(total).all() and torch.isfinite(m.log_alpha_sq.grad).all()
    bound = 1e-3 if s_value < 0 else 1e3
    torch.testing.assert_close(m.alphas(), torch.full((1, 2), bound))
    torch.testing.assert_close(m.weights(), torch.full((1, 2), 1 / bound**2))
    torch.testing.assert_close(m.log_alpha_sq.detach(), torch.full((1, 2), 2 * math.log(bound)))  # projected
    # At alpha_min a loss of 1 is weighted 1e6: the gradient pushes alpha up; at alpha_max the regulariser
    # (~ sigmoid(s) = 1) pulls it down. The straight-through clamp lets both act.
    grad = m.log_alpha_sq.grad
    assert (grad < 0).all() if s_value < 0 else (grad > 0).all()


def test_rruw_single_task_zero_loss_stays_bounded():
    m = RRUWWeighting(1, 2)
    descend(m, [0.0, 1.0], torch.optim.Adam(m.parameters(), lr=1.0), steps=50)
    w = m.weights()
    assert torch.isfinite(w).all() and w.max().item() <= 1e6 * (1 + 1e-5)


def test_druw_total_matches_eq6():
    m = DRUWWeighting(2, 4)
    m.end_epoch(torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]]))
    # before two epochs: lambda = 1 -> weights = 1/alpha^2 + 1
    set_alphas(m, [[0.5, 1.0, 2.0, 4.0], [1.0, 2.0, 1.0, 0.5]])
    torch.testing.assert_close(m.weights()[1], torch.tensor([2.0, 1.25, 2.0, 5.0]))
    m.end_epoch(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
    lam = [hand_dwa([1, 2, 3, 4], [2, 2, 2, 2]), [1.0, 1.0, 1.0, 1.0]]
    alphas = [[0.5, 1.0, 2.0, 4.0], [1.0, 2.0, 1.0, 0.5]]
    losses = [[0.3, 0.7, 1.2, 2.0], [1.0, 2.0, 3.0, 4.0]]
    expected = [sum((1 / a**2 + lk) * l for a, lk, l in zip(al, lr, ls)) + hand_rruw_regs(al)
                for al, lr, ls in zip(alphas, lam, losses)]
    torch.testing.assert_close(m(torch.tensor(losses)), torch.tensor(expected))
    expected_w = [[1 / a**2 + lk for a, lk in zip(al, lr)] for al, lr in zip(alphas, lam)]
    torch.testing.assert_close(m.weights(), torch.tensor(expected_w))
    assert m.weights().requires_grad is False


def test_runs_are_independent_and_state_has_run_dim():
    for name in WEIGHTINGS:
        m = build_weighting(name, 3, 4)
        m.set_run_seeds([10, 11, 12])
        losses = torch.tensor([[0.3, 0.7, 1.2, 2.0], [1.0, 2.0, 3.0, 4.0], [0.1, 0.1, 0.1, 0.1]])
        m.end_epoch(losses)
        m.end_epoch(losses * torch.tensor([1.0, 0.5, 2.0, 1.0]))
        solo = build_weighting(name, 1, 4)
        solo.set_run_seeds([11])
        solo.load_state_dict({k: v[1:2] for k, v in m.state_dict().items()})
        totals = m(losses)
        torch.testing.assert_close(solo(losses[1:2]), totals[1:2])
        for key, value in m.state_dict().items():
            assert value.shape[0] == 3, (name, key)


def test_druw_beta_balances_the_dwa_term_and_its_ends_are_druw_and_rruw():
    alphas = [[0.5, 1.0, 2.0, 4.0]]
    losses = torch.tensor([[0.3, 0.7, 1.2, 2.0]])
    epochs = [torch.tensor([[2.0, 2.0, 2.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])]

    def built(cls, **options):
        m = cls(1, 4, **options)
        for e in epochs:
            m.end_epoch(e)
        set_alphas(m, alphas)
        return m

    lam = hand_dwa([1, 2, 3, 4], [2, 2, 2, 2])
    expected = sum((1 / a**2 + 0.5 * lk) * x for a, lk, x in zip(alphas[0], lam, losses[0].tolist()))
    torch.testing.assert_close(built(DRUWWeighting, beta=0.5)(losses),
                               torch.tensor([expected + hand_rruw_regs(alphas[0])]))
    assert torch.equal(built(DRUWWeighting, beta=1.0)(losses), built(DRUWWeighting)(losses))
    rruw, druw0 = built(RRUWWeighting), built(DRUWWeighting, beta=0.0)
    assert torch.equal(druw0(losses), rruw(losses)) and torch.equal(druw0.weights(), rruw.weights())
    rruw(losses).sum().backward()
    druw0(losses).sum().backward()
    assert torch.equal(druw0.log_alpha_sq.grad, rruw.log_alpha_sq.grad)
    with pytest.raises(WeightingError, match=r"^option beta must be finite and >= 0, got -1$"):
        build_weighting("druw", 1, 4, beta=-1)


def test_uw_is_kendalls_uncertainty_weighting_with_rruws_bounds():
    m = UWWeighting(1, 3)
    set_alphas(m, [[0.5, 1.0, 2.0]])
    losses = [0.4, 1.0, 3.0]
    expected = sum(x / a**2 + math.log(a**2) for a, x in zip([0.5, 1.0, 2.0], losses))
    torch.testing.assert_close(m(torch.tensor([losses])), torch.tensor([expected]))
    torch.testing.assert_close(m.weights(), torch.tensor([[4.0, 1.0, 0.25]]))
    assert weighting_options("uw") == {"alpha_init": 1.0, "alpha_min": 1e-3, "alpha_max": 1e3}
    # a vanishing loss pulls its weight up (s -> log L) only to the bound: finite
    zero = UWWeighting(1, 2)
    descend(zero, [0.0, 1.0], torch.optim.SGD(zero.parameters(), lr=50.0), steps=200)
    w = zero.weights()
    assert torch.isfinite(w).all() and w[0, 0] <= 1 / 1e-3**2 * 1.0001 and w[0, 0] > 1e5


def test_rlw_draws_k_times_softmax_of_normals_from_each_runs_generator():
    m = RLWWeighting(2, 3)
    with pytest.raises(WeightingError, match="needs the runs' seeds"):
        m(torch.ones(2, 3))
    m.set_run_seeds([4, 9])
    gens = [torch.Generator().manual_seed(s + RLWWeighting.SEED_OFFSET) for s in (4, 9)]
    losses = torch.tensor([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]])
    for _ in range(3):   # a new draw every step
        total = m(losses)
        z = torch.stack([torch.randn(3, generator=g) for g in gens])
        lam = 3 * torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
        torch.testing.assert_close(m.weights(), lam)
        torch.testing.assert_close(total, (lam * losses).sum(-1))
        torch.testing.assert_close(m.weights().sum(-1), torch.tensor([3.0, 3.0]))


def test_rlw_draws_resume_from_a_checkpoint_written_by_accelerate(tmp_path):
    """Fine-tuning checkpoints with `accelerator.save_state` (safetensors): the generators' states travel in
    the module's state dict, so the draws after a resume are the draws an unbroken run makes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    losses = torch.ones(2, 3)
    model = torch.nn.Module()
    model.weighting = RLWWeighting(2, 3)
    model.weighting.set_run_seeds([4, 9])
    accelerator = Accelerator(cpu=True)
    try:
        model = accelerator.prepare(model)
        model.weighting(losses)
        accelerator.save_state(str(tmp_path / "ckpt"))
        unbroken = [model.weighting(losses).clone() for _ in range(3)]
        fresh = RLWWeighting(2, 3)
        fresh.set_run_seeds([0, 0])                       # other generators, until the checkpoint is loaded
        model.weighting = fresh
        accelerator.load_state(str(tmp_path / "ckpt"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)   # no accelerate state leaks into other tests
    for want in unbroken:
        torch.testing.assert_close(model.weighting(losses), want, rtol=0, atol=0)
    with pytest.raises(WeightingError, match="holds 2 generators for 3 runs"):
        RLWWeighting(3, 3).set_extra_state(model.weighting.get_extra_state())


def test_gls_is_the_geometric_mean_and_finite_at_zero_loss():
    m = GLSWeighting(2, 3)
    losses = torch.tensor([[0.5, 2.0, 4.0], [1.0, 1.0, 1.0]], requires_grad=True)
    total = m(losses)
    torch.testing.assert_close(total, torch.tensor([(0.5 * 2.0 * 4.0) ** (1 / 3), 1.0]))
    torch.testing.assert_close(m.weights(), total.detach().unsqueeze(-1) / (3 * losses.detach()))
    total.sum().backward()
    torch.testing.assert_close(losses.grad, m.weights())   # the logged weight is d total / d L_k
    zero = torch.tensor([[0.0, 1.0, 1.0]], requires_grad=True)
    out = GLSWeighting(1, 3)(zero)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zero.grad).all()


def test_famo_follows_the_papers_update_written_with_autograd_and_torch_adam():
    """Liu et al.'s reference: the loss sum_k z_k log L_k / c (times K here), then xi's gradient
    autograd.grad(softmax(xi), xi, grad_outputs=log L_before - log L_after) stepped by torch.optim.Adam with
    weight_decay; each of the two runs on its own."""
    m = FAMOWeighting(2, 3, lr=0.1, decay=0.01)
    assert FAMOWeighting.measures_steps and m.weights().sum(-1).tolist() == [3.0, 3.0]
    xis = [torch.zeros(3, requires_grad=True) for _ in range(2)]
    adams = [torch.optim.Adam([xi], lr=0.1, weight_decay=0.01) for xi in xis]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        before = torch.rand(2, 3, generator=gen) + 0.1
        after = before * (torch.rand(2, 3, generator=gen) * 0.5 + 0.5)
        losses = before.clone().requires_grad_(True)
        total = m(losses)
        total.sum().backward()
        for r, (xi, adam) in enumerate(zip(xis, adams)):
            z = torch.softmax(xi.detach(), -1)
            c = (z / before[r]).sum()
            torch.testing.assert_close(total[r], 3 * (z * before[r].log() / c).sum())
            torch.testing.assert_close(losses.grad[r], 3 * z / (c * before[r]))     # the effective weights
            torch.testing.assert_close(m.weights()[r], 3 * z / (c * before[r]))
        m.after_step(after)
        for r, (xi, adam) in enumerate(zip(xis, adams)):
            delta = before[r].log() - after[r].log()
            xi.grad = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)[0]
            adam.step()
            torch.testing.assert_close(m.logits[r], xi.detach())
    assert m.logits.abs().sum() > 0.1                                  # the weights really moved


def test_famo_is_finite_on_zero_and_non_finite_losses():
    m = FAMOWeighting(1, 3)
    losses = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    total = m(losses)
    total.sum().backward()
    assert torch.isfinite(total).all() and torch.isfinite(losses.grad).all()
    m.after_step(torch.tensor([[0.0, float("nan"), float("inf")]]))
    assert torch.isfinite(m.logits).all() and torch.isfinite(m(torch.ones(1, 3))).all()
