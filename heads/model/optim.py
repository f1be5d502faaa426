"""Optimiser and LR schedule for R runs stacked along a leading dimension.

The ablation grid trains many runs of one architecture inside one stacked module (every parameter has
leading dim R). `torch.optim.AdamW` has one learning rate per parameter group and `clip_grad_norm_` one norm
for everything, which would couple the runs: run 3's plateau would halve run 5's learning rate and run 3's
exploding gradient would shrink everybody's step. These versions keep every run on its own:
a learning-rate tensor [R], per-run gradient clipping, per-run plateau bookkeeping. For R = 1 they reduce
exactly to AdamW / clip_grad_norm_ / ReduceLROnPlateau(mode="max").

Only torch's public API is used: the update is torch's functional AdamW (`torch.optim.adamw.adamw`, the
function behind `torch.optim.AdamW`) with `fused=True` where that kernel exists and gives AdamW's step on the
parameters' device and dtype (CPU from torch 2.4, CUDA), else the same arithmetic in plain tensor ops.
"""
from __future__ import annotations

import math
import reprlib
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.optim.adamw as torch_adamw  # the module: torch.optim's namespace drops the name
from torch import Tensor

from cache.command_kit.errors import AvbError
from heads.model.layers import grad_sq_norms


class PlateauStateError(AvbError):
    """A saved plateau schedule state (from a checkpoint file) that is not what `PlateauHalving.state_dict` writes."""


# ----------------------------------------------------------------------------------------- the update

def _fused_adamw_(ps: list[Tensor], grads: list[Tensor], avgs: list[Tensor], sqs: list[Tensor], step: int,
                  lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """AdamW step number `step` on every tensor of `ps` at rate `lr`: torch's fused kernel via its public functional.

    The functional counts the steps itself (it adds 1 to each step tensor before the update) and wants one
    tensor per parameter, so it gets `step - 1` in fresh views of one small buffer.
    """
    steps = list(torch.full((len(ps),), float(step - 1), dtype=torch.float32, device=ps[0].device).unbind(0))
    torch_adamw.adamw(ps, grads, avgs, sqs, [], steps, foreach=False, fused=True, amsgrad=False, beta1=betas[0],
                      beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)


def _plain_adamw_(p: Tensor, grad: Tensor, avg: Tensor, sq: Tensor, step: int, lr: float | Tensor,
                  betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """The same step on one tensor in plain tensor ops (torch's single-tensor AdamW, op for op).

    `lr` is a float, or a float64 tensor with one rate per leading row of `p` (then the rows are stepped at
    their own rates in one pass).
    """
    beta1, beta2 = betas
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = (1.0 - beta2 ** step) ** 0.5
    if isinstance(lr, Tensor):
        shape = (-1,) + (1,) * (p.ndim - 1)
        p.mul_((1.0 - lr * weight_decay).to(p.dtype).reshape(shape))
    else:
        p.mul_(1.0 - lr * weight_decay)
    avg.lerp_(grad, 1.0 - beta1)
    sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (sq.sqrt() / bias2_sqrt).add_(eps)
    if isinstance(lr, Tensor):
        p.sub_(avg.div(denom).mul_((lr / bias1).to(p.dtype).reshape(shape)))
    else:
        p.addcdiv_(avg, denom, value=-lr / bias1)


_FUSED_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def fused_adamw_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused AdamW runs on this kind of device for this dtype and takes AdamW's first step.

    Asked once per device type and dtype (a one-element trial step, read back): the kernel came to the CPU in
    torch 2.4 and is missing on some devices, and the functional's signature is torch's to change, so any
    failure of the trial -- an exception or a wrong value -- selects the plain-tensor update instead.
    """
    key = (device.type, dtype)
    if key not in _FUSED_WORKS:
        p = torch.zeros(1, dtype=dtype, device=device)
        try:
            _fused_adamw_([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], step=1, lr=0.5,
                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            works = abs(p.item() + 0.5) < 1e-3    # AdamW's first step is -lr * sign(grad)
        except Exception:   # noqa: BLE001 - a capability probe: whatever fails means "not here"
            works = False
        _FUSED_WORKS[key] = works
    return _FUSED_WORKS[key]


# ----------------------------------------------------------------------------------------- the optimiser

@dataclass
class _Group:
    params: list[Tensor]
    runs: Tensor          # long [R_g] on the parameters' device: which run each row of the leading dim belongs to
    weight_decay: float
    run_list: list[int]   # the same on the host, read every step without a device round trip


class StackedAdamW:
    """AdamW (decoupled weight decay, Loshchilov & Hutter) with a learning rate per run.

    `params` is a list of tensors whose leading dim is the run dim R, or a list of groups
    `{"params": [...], "runs": [run index per leading row], "weight_decay": wd}`: the `runs` mapping lets a
    module that covers only some runs (one loss-weighting module per weighting kind) share the optimiser,
    the per-run learning rate and the per-run gradient norm. `lr` holds the current rate of each run (on the
    host: schedules write into it once per epoch); the parameters may live on any device.

    Each run's rows take torch's AdamW step at that run's rate, so each run's slice follows AdamW exactly,
    whatever the other runs do. `fused`: True, torch's fused kernel (an error where it does not work); False,
    plain tensor ops; None, the kernel wherever `fused_adamw_works` for the parameters' device and dtypes.
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
        sync_free: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        self.n_runs = int(n_runs)
        lr_t = torch.as_tensor(lr, dtype=torch.float64).detach().cpu()
        self.lr = (lr_t.expand(self.n_runs) if lr_t.ndim == 0 else lr_t).clone()
        if self.lr.shape != (self.n_runs,):
            raise ValueError(
                f"lr must be a scalar or have one value per run ({self.n_runs}), got shape {tuple(self.lr.shape)}")
        self.betas = betas
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.groups = [self._group(item, weight_decay) for item in _group_dicts(params)]
        self.device = next((p.device for p in self.params()), torch.device("cpu"))
        # Accelerators clip without reading the norms back (see `step`); None: decided by the device.
        self.sync_free = self.device.type != "cpu" if sync_free is None else bool(sync_free)
        self.fused = self._use_fused(fused)
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self._views: dict[Tensor, tuple[tuple[Tensor, ...], ...]] = {}   # per-row views, see _row_calls
        self.step_count = 0
        self.last_grad_norms = torch.zeros(self.n_runs, dtype=torch.float64, device=self.device)

    def _group(self, item: dict, weight_decay: float) -> _Group:
        plist = list(item["params"])
        runs = torch.as_tensor(item.get("runs", range(self.n_runs)), dtype=torch.long)
        for p in plist:
            if p.ndim == 0 or p.shape[0] != len(runs):
                raise ValueError(f"parameter of shape {tuple(p.shape)} has no leading run dim of size {len(runs)}")
        if len(runs) and (runs.min() < 0 or runs.max() >= self.n_runs):
            raise ValueError(f"run indices {runs.tolist()} out of range for {self.n_runs} runs")
        device = plist[0].device if plist else torch.device("cpu")
        return _Group(plist, runs.to(device), float(item.get("weight_decay", weight_decay)), runs.tolist())

    def _use_fused(self, fused: bool | None) -> bool:
        if fused is False:
            return False
        kinds = {(p.device, p.dtype) for p in self.params()}
        works = all(fused_adamw_works(device, dtype) for device, dtype in kinds)
        if fused and not works:
            raise ValueError(f"torch {torch.__version__}'s fused AdamW does not work for "
                             f"{sorted(f'{d.type} {dt}' for d, dt in kinds)}; pass fused=None or False")
        return works

    def params(self) -> list[Tensor]:
        return [p for g in self.groups for p in g.params]

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def grad_norms(self) -> Tensor:
        """L2 norm of each run's gradient over all its parameter slices, float64 [R] on the parameters' device.

        Like `clip_grad_norm_`: a norm per tensor (here per tensor row) in the gradient's dtype, then the norm
        of those norms. A weight written by `StackedLinear` brings its norm along (computed from two small Gram
        matrices), so the big gradients are not read again here.
        """
        sq = torch.zeros(self.n_runs, dtype=torch.float64, device=self.device)
        for g in self.groups:
            rows = [grad_sq_norms(p, p.shape[0]) for p in g.params if p.grad is not None]
            if rows:
                sq.index_add_(0, g.runs, torch.stack(rows).to(torch.float64).sum(0))
        return sq.sqrt()

    def keep_runs(self, keep: Sequence[int]) -> None:
        """Go on with the runs `keep` (old indices, in order) only, after their modules were cut to them
        (heads.model.layers.keep_runs_): every group's rows, moments and rates of the other runs go, and a group
        left without runs (the weighting module of only dropped runs) goes with them. Renumbers the runs."""
        new_index = {r: i for i, r in enumerate(keep)}
        groups = []
        for g in self.groups:
            rows = [i for i, r in enumerate(g.run_list) if r in new_index]
            for p in g.params:
                state = self.state.pop(p, None)
                self._views.pop(p, None)
                if not rows:
                    continue
                if p.shape[0] != len(rows):
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} was not cut to its {len(rows)} kept runs")
                if state is not None:
                    index = torch.as_tensor(rows, dtype=torch.long, device=p.device)
                    self.state[p] = {k: v.index_select(0, index) for k, v in state.items()}
            if rows:
                run_list = [new_index[g.run_list[i]] for i in rows]
                groups.append(_Group(g.params, torch.as_tensor(run_list, dtype=torch.long, device=g.runs.device),
                                     g.weight_decay, run_list))
        self.groups, self.n_runs = groups, len(keep)
        self.lr = self.lr[list(keep)].clone()
        self.last_grad_norms = self.last_grad_norms[list(keep)].clone()

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        return state

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of every run at its own learning rate, after clipping each run's gradient norm.

        Why torch's fused AdamW kernel: the update is memory-bound (every parameter, gradient and moment is
        read and written once per step, and a batch of 8 costs little else), and the kernel does it in one pass
        without temporaries. Clipping multiplies the clipped runs' gradient rows by their coefficient, in place,
        as `clip_grad_norm_` does (on the CPU only the rows of the runs that are clipped: a few of them in most
        steps; on an accelerator every row by its coefficient, 1 for most, so the norms are never read back).
        """
        if self.max_grad_norm is not None:
            self.last_grad_norms = norms = self.grad_norms()
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            if self.sync_free:
                self._scale_rows_(coef)
            else:
                coefs = coef.tolist()
                self._scale_runs_({r: c for r, c in enumerate(coefs) if c < 1.0})
        self.step_count += 1
        lrs = self.lr.tolist()
        for g in self.groups:
            params = [p for p in g.params if p.grad is not None]
            if params:
                update = self._fused_update if self.fused else self._plain_update
                update(g, params, [self._state(p) for p in params], [lrs[r] for r in g.run_list])

    def _fused_update(self, g: _Group, params: list[Tensor], states: list[dict[str, Tensor]],
                      rates: list[float]) -> None:
        """The kernel takes one learning rate, so rows are grouped by rate: one call on the whole tensors while
        the group's runs agree, else one call per distinct rate on the rows (views) of its runs."""
        if all(r == rates[0] for r in rates):
            calls = [(rates[0], list(params), [p.grad for p in params],
                      [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states])]
        else:
            calls = self._row_calls(params, states, rates)
        for lr, ps, grads, avgs, sqs in calls:
            _fused_adamw_(ps, grads, avgs, sqs, self.step_count, float(lr), self.betas, self.eps, g.weight_decay)

    def _plain_update(self, g: _Group, params: list[Tensor], states: list[dict[str, Tensor]],
                      rates: list[float]) -> None:
        """Tensor by tensor; differing rates go in as one rate per row, so no tensor is split into rows."""
        lr: float | Tensor = rates[0]
        if any(r != rates[0] for r in rates):
            lr = torch.tensor(rates, dtype=torch.float64).to(params[0].device, non_blocking=True)
        for p, st in zip(params, states):
            _plain_adamw_(p, p.grad, st["exp_avg"], st["exp_avg_sq"], self.step_count, lr, self.betas, self.eps,
                          g.weight_decay)

    def _scale_runs_(self, coefs: dict[int, float]) -> None:
        """Multiply the gradient rows of the runs in `coefs` (run -> coefficient, on the host) in place."""
        if not coefs:
            return
        for g in self.groups:
            rows = [(i, coefs[r]) for i, r in enumerate(g.run_list) if r in coefs]
            for p in g.params:
                if p.grad is not None:
                    for i, c in rows:
                        p.grad[i].mul_(c)

    def _scale_rows_(self, coef: Tensor) -> None:
        """Multiply each run's gradient rows by its coefficient (coef [R], on the parameters' device)."""
        for g in self.groups:
            c = coef[g.runs]
            for p in g.params:
                if p.grad is not None:
                    p.grad.mul_(c.to(p.grad.dtype).reshape((-1,) + (1,) * (p.ndim - 1)))

    def _row_calls(self, params: list[Tensor], states: list[dict[str, Tensor]], keys: list[Hashable]
                   ) -> list[tuple[Hashable, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]:
        """Per distinct key, the row views (one per run row and parameter) of params, grads and moments.

        `unbind` makes a tensor's R row views in one call; the views of parameters and moments are cached
        (their storage never changes), those of the gradients are new each step.
        """
        rows: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)
        views = []
        for p, st in zip(params, states):
            cached = self._views.get(p)
            if cached is None:
                cached = self._views[p] = (p.unbind(0), st["exp_avg"].unbind(0), st["exp_avg_sq"].unbind(0))
            views.append((*cached, p.grad.unbind(0)))
        return [(key, [v[0][i] for v in views for i in idx], [v[3][i] for v in views for i in idx],
                 [v[1][i] for v in views for i in idx], [v[2][i] for v in views for i in idx])
                for key, idx in rows.items()]


def _group_dicts(params: Iterable[Tensor] | Iterable[dict]) -> list[dict]:
    items = list(params)
    return [{"params": items}] if items and isinstance(items[0], Tensor) else items


# ----------------------------------------------------------------------------------------- the schedule

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

    def keep_runs(self, keep: Sequence[int]) -> None:
        """The kept runs' plateau state (the optimiser keeps their rates: StackedAdamW.keep_runs)."""
        self.best, self.num_bad_epochs = self.best[list(keep)], self.num_bad_epochs[list(keep)]

    def state_dict(self) -> dict[str, list]:
        """The per-run bookkeeping as JSON values: `best` (None where no score beat -inf yet) and `num_bad_epochs`."""
        return {"best": [float(b) if math.isfinite(b) else None for b in self.best],
                "num_bad_epochs": [int(n) for n in self.num_bad_epochs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (one value per run); the learning rates live in the optimiser.

        It comes from a checkpoint file, so any other shape (torch's ReduceLROnPlateau state among them) is a
        PlateauStateError that says what was expected.
        """
        parsed = _plateau_state(state, self.best.shape[0])
        if parsed is None:
            n = self.best.shape[0]
            raise PlateauStateError(
                f"plateau schedule state {reprlib.repr(state)}: expected PlateauHalving.state_dict's "
                f"{{'best': [{n} numbers or null], 'num_bad_epochs': [{n} counts]}}")
        self.best, self.num_bad_epochs = parsed


def _plateau_state(state: Any, n_runs: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(best, num_bad_epochs) from `state_dict`'s value for `n_runs` runs, or None where it has another shape."""
    if not isinstance(state, Mapping) or set(state) != {"best", "num_bad_epochs"}:
        return None
    best, bad = state["best"], state["num_bad_epochs"]
    if not (isinstance(best, (list, tuple)) and isinstance(bad, (list, tuple)) and len(best) == len(bad) == n_runs):
        return None
    if not all(b is None or (_is_number(b) and math.isfinite(b)) for b in best):
        return None
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0 for k in bad):
        return None
    return (np.array([-np.inf if b is None else float(b) for b in best], dtype=np.float64),
            np.array(bad, dtype=np.int64).reshape(n_runs))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
