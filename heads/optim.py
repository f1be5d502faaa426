"""Optimiser and LR schedule for R runs stacked along a leading dimension.

The ablation grid trains many runs of one architecture inside one stacked module (every parameter has
leading dim R). `torch.optim.AdamW` has one learning rate per parameter group and `clip_grad_norm_` one norm
for everything, which would couple the runs: run 3's plateau would halve run 5's learning rate and run 3's
exploding gradient would shrink everybody's step. These versions keep every run on its own:
a learning-rate tensor [R], per-run gradient clipping, per-run plateau bookkeeping. For R = 1 they reduce
exactly to AdamW / clip_grad_norm_ / ReduceLROnPlateau(mode="max").
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class _Group:
    params: list[Tensor]
    runs: Tensor          # long [R_g]: which run each row of the leading dim belongs to
    weight_decay: float


class StackedAdamW:
    """AdamW (decoupled weight decay, Loshchilov & Hutter) with a learning rate per run.

    `params` is a list of tensors whose leading dim is the run dim R, or a list of groups
    `{"params": [...], "runs": [run index per leading row], "weight_decay": wd}`: the `runs` mapping lets a
    module that covers only some runs (one loss-weighting module per weighting kind) share the optimiser,
    the per-run learning rate and the per-run gradient norm. `lr` holds the current rate of each run;
    schedules write into it.

    The update is the one of `torch.optim.AdamW` (single-tensor path) with `lr` broadcast per run, so each
    run's slice follows AdamW exactly.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        n_runs: int,
        lr: float | Sequence[float] | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 5.0,
    ) -> None:
        self.n_runs = int(n_runs)
        lr_t = torch.as_tensor(lr, dtype=torch.float64).detach()
        self.lr = (lr_t.expand(self.n_runs) if lr_t.ndim == 0 else lr_t).clone()
        if self.lr.shape != (self.n_runs,):
            raise ValueError(
                f"lr must be a scalar or have one value per run ({self.n_runs}), got shape {tuple(self.lr.shape)}")
        self.betas = betas
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.groups: list[_Group] = []
        items = list(params)
        if items and isinstance(items[0], Tensor):
            items = [{"params": items}]
        for item in items:
            plist = list(item["params"])
            runs = torch.as_tensor(item.get("runs", range(self.n_runs)), dtype=torch.long)
            for p in plist:
                if p.ndim == 0 or p.shape[0] != len(runs):
                    raise ValueError(
                        f"parameter of shape {tuple(p.shape)} has no leading run dim of size {len(runs)}")
            if len(runs) and (runs.min() < 0 or runs.max() >= self.n_runs):
                raise ValueError(f"run indices {runs.tolist()} out of range for {self.n_runs} runs")
            self.groups.append(_Group(plist, runs, float(item.get("weight_decay", weight_decay))))
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self.step_count = 0
        self.last_grad_norms = torch.zeros(self.n_runs, dtype=torch.float64)

    def params(self) -> list[Tensor]:
        return [p for g in self.groups for p in g.params]

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def grad_norms(self) -> Tensor:
        """L2 norm of each run's gradient over all its parameter slices, float64 [R].

        Like `clip_grad_norm_`: a norm per tensor (here per tensor row) in the gradient's dtype, then the norm
        of those norms, so the cost is one pass over the gradients, not a float64 copy of them.
        """
        sq = torch.zeros(self.n_runs, dtype=torch.float64)
        for g in self.groups:
            for p in g.params:
                if p.grad is None:
                    continue
                per_row = torch.linalg.vector_norm(p.grad.detach().reshape(p.shape[0], -1), 2, dim=1)
                sq.index_add_(0, g.runs, per_row.to(torch.float64).square())
        return sq.sqrt()

    def clip_grad_norms_(self, max_norm: float) -> Tensor:
        """Scale each run's gradients like `clip_grad_norm_` does for one model; returns the norms before."""
        norms = self.grad_norms()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        if bool((coef < 1.0).any()):
            for g in self.groups:
                c = coef[g.runs]
                for p in g.params:
                    if p.grad is not None:
                        p.grad.mul_(c.to(p.grad.dtype).reshape((-1,) + (1,) * (p.ndim - 1)))
        return norms

    @torch.no_grad()
    def step(self) -> None:
        if self.max_grad_norm is not None:
            self.last_grad_norms = self.clip_grad_norms_(self.max_grad_norm)
        self.step_count += 1
        beta1, beta2 = self.betas
        t = self.step_count
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        for g in self.groups:
            # Per-run factors in float64 (as torch's Python floats), rounded once to the parameter dtype.
            # AdamW: p -= step * m / (sqrt(v) / bc2 + eps) with step = lr / bc1; written as
            # p -= m / (sqrt(v) * (1 / (bc2 * step)) + eps / step) to update in place with one temporary.
            step_rows = self.lr[g.runs] / bias_correction1
            inv_scale_rows = 1.0 / (bias_correction2_sqrt * step_rows)
            eps_rows = self.eps / step_rows
            decay_rows = 1 - self.lr[g.runs] * g.weight_decay
            for p in g.params:
                if p.grad is None:
                    continue
                grad = p.grad
                shape = (-1,) + (1,) * (p.ndim - 1)
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if g.weight_decay:
                    p.mul_(decay_rows.to(p.dtype).reshape(shape))
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().mul_(inv_scale_rows.to(p.dtype).reshape(shape))
                denom.add_(eps_rows.to(p.dtype).reshape(shape))
                p.addcdiv_(exp_avg, denom, value=-1.0)


class PlateauHalving:
    """`ReduceLROnPlateau(mode="max", factor=0.5, patience=5)` kept separately for each run.

    The paper halves the learning rate "once the performance fails to improve for 5 epochs"; the reference
    code used factor 0.9. Semantics follow torch exactly (relative threshold 1e-4, the rate drops on the
    epoch where the count of non-improving epochs exceeds `patience`) so a run here matches a run with the
    torch scheduler.
    """

    def __init__(
        self,
        optimizer: StackedAdamW,
        patience: int = 5,
        factor: float = 0.5,
        threshold: float = 1e-4,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"lr factor must be in (0, 1), got {factor}")
        self.optimizer = optimizer
        self.patience = patience
        self.factor = factor
        self.threshold = threshold
        self.min_lr = min_lr
        self.eps = eps
        n = optimizer.n_runs
        self.best = np.full(n, -np.inf)
        self.num_bad_epochs = np.zeros(n, dtype=np.int64)

    def step(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Feed one validation score per run; returns a bool mask of the runs whose rate was reduced."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.best.shape:
            raise ValueError(f"expected {self.best.shape[0]} scores, got shape {scores.shape}")
        better = scores > self.best * (1.0 + self.threshold)
        self.best = np.where(better, scores, self.best)
        self.num_bad_epochs = np.where(better, 0, self.num_bad_epochs + 1)
        reduce = self.num_bad_epochs > self.patience
        if reduce.any():
            old = self.optimizer.lr.numpy().copy()
            new = np.maximum(old * self.factor, self.min_lr)
            apply = reduce & (old - new > self.eps)
            self.optimizer.lr.copy_(torch.from_numpy(np.where(apply, new, old)))
            self.num_bad_epochs = np.where(reduce, 0, self.num_bad_epochs)
        return reduce
