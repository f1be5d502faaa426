"""Training losses of a corpus's tasks, vectorised over R stacked runs.

Regression tasks use 1 - CCC (the challenge metric) per column with POPULATION moments over the batch, averaged
over the task's columns; classification tasks use cross-entropy on raw logits. The authors' code mixed unbiased variance with
biased covariance (a perfect prediction on a batch of 8 scored 7/8) and had no epsilon (a constant batch gave
NaN); this version is exact and finite everywhere.

Unknown labels follow the project's convention (`heads.metrics`): NaN in a regression target, NaN (float) or
a negative index (long) for TYPE. They are left out of the loss rather than poisoning the whole batch.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.tasks import TaskSet

IGNORE_INDEX = -100  # TYPE target value that marks an unknown class (torch's cross_entropy default)


class LossInputError(ValueError):
    """Outputs/targets handed to a loss have the wrong keys, shapes or values."""


def ccc_loss_columns(pred: Tensor, target: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """1 - CCC of every column over the batch axis (dim -2): [..., B, k] -> (loss [..., k], column known [..., k]).

    Computed as MSE / (var_p + var_t + (mean_p - mean_t)^2 + eps), which is algebraically 1 - CCC
    (the numerator var_p + var_t + (mean_p - mean_t)^2 - 2 cov equals the mean squared error), with population
    moments. Written this way a perfect prediction gives exactly 0 and there is no cancellation; the eps in
    the denominator keeps a constant batch (or a batch of one) finite -- 0 if pred equals target, ~1 otherwise.
    NaN targets are masked out per column; `known` is 1 for a column with at least one known target.
    """
    if pred.shape != target.shape or pred.dim() < 2:
        raise LossInputError(
            f"ccc_loss needs pred and target of equal shape [..., B, k], got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}")
    pred = pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred
    target = target.to(pred.dtype)
    known = torch.isfinite(target)
    m = known.to(pred.dtype)
    t = torch.where(known, target, torch.zeros_like(target))
    p = torch.where(known, pred, torch.zeros_like(pred))
    n = m.sum(-2, keepdim=True)
    n_safe = n.clamp_min(1.0)
    mean_t = t.sum(-2, keepdim=True) / n_safe
    mean_p = p.sum(-2, keepdim=True) / n_safe
    var_t = (m * (t - mean_t).square()).sum(-2, keepdim=True) / n_safe
    var_p = (m * (p - mean_p).square()).sum(-2, keepdim=True) / n_safe
    mse = (m * (p - t).square()).sum(-2, keepdim=True) / n_safe
    per_col = (mse / (var_p + var_t + (mean_p - mean_t).square() + eps)).squeeze(-2)  # [..., k]
    return per_col, (n.squeeze(-2) > 0).to(pred.dtype)


def ccc_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - CCC per column over the batch axis (dim -2), averaged over columns: [R, B, k] -> [R].

    See `ccc_loss_columns`. A column with no known target is left out of the column mean, and a run with no
    known target at all gets loss 0 (no gradient).
    """
    per_col, col_known = ccc_loss_columns(pred, target, eps)
    return (per_col * col_known).sum(-1) / col_known.sum(-1).clamp_min(1.0)


def type_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of each run: logits [R, B, C], class indices [R, B] (long) -> [R].

    Plain logits (the reference code passed them through BatchNorm first, which couples samples and breaks
    at batch size 1). Targets equal to IGNORE_INDEX are left out; a run with none known gets 0.
    """
    if logits.dim() < 2 or target.shape != logits.shape[:-1]:
        raise LossInputError(
            f"type_loss needs logits [R, B, C] and target [R, B], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}")
    n_classes = logits.shape[-1]
    target = target.long()
    bad = (target >= n_classes) | ((target < 0) & (target != IGNORE_INDEX))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise LossInputError(f"type target holds class index {value}, outside 0..{n_classes - 1}")
    ce = F.cross_entropy(
        logits.float().reshape(-1, n_classes), target.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).reshape(target.shape)
    known = (target != IGNORE_INDEX).to(ce.dtype)
    return (ce * known).sum(-1) / known.sum(-1).clamp_min(1.0)


def _aligned_target(tasks: TaskSet, name: str, out: Tensor, target: Tensor) -> Tensor:
    """Bring a target to [R, B, label_dim]; a target without the run dim ([B, label_dim]) is shared by all runs."""
    task = tasks[name]
    if out.dim() != 3:
        raise LossInputError(f"output of task {name!r} must be [R, B, {task.out_dim}], got {tuple(out.shape)}")
    r, b = out.shape[:2]
    if task.is_classification and target.shape in ((r, b), (b,)):
        target = target.unsqueeze(-1)
    if target.dim() == 2:
        target = target.unsqueeze(0).expand(r, *target.shape)
    if target.shape != (r, b, task.label_dim):
        raise LossInputError(
            f"target of task {name!r} must be [R, B, {task.label_dim}] or [B, {task.label_dim}] to match output "
            f"{tuple(out.shape)}, got {tuple(target.shape)}")
    return target


def task_losses(tasks: TaskSet, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """The raw task losses of each run, stacked in `tasks` order (A-VB: type, two, high, culture): [R, K].

    outputs: task -> [R, B, out_dim] (logits, regression values). targets: task -> [R, B, label_dim] (or
    [B, label_dim], shared by the runs), a classification task holding the class index as a float (NaN =
    unknown) or long. The regression tasks' columns are scored in one pass (one CCC over all their columns,
    then a mean per task).
    """
    names = tasks.names
    aligned = {}
    for name in names:
        if name not in outputs:
            raise LossInputError(f"outputs lack task {name!r}; got {', '.join(outputs) or 'none'}")
        if name not in targets:
            raise LossInputError(f"targets lack task {name!r}; got {', '.join(targets) or 'none'}")
        out = outputs[name]
        if out.dim() == 3 and out.shape[-1] != tasks[name].out_dim:
            raise LossInputError(
                f"output of task {name!r} has width {out.shape[-1]}, expected {tasks[name].out_dim}")
        aligned[name] = _aligned_target(tasks, name, out, targets[name]).to(out.device)
    classification = [n for n in names if tasks[n].is_classification]
    regression = [n for n in names if not tasks[n].is_classification]
    losses = {}
    for name in classification:
        index = aligned[name].squeeze(-1)
        if index.is_floating_point():
            index = torch.where(torch.isfinite(index), index, torch.full_like(index, IGNORE_INDEX))
        losses[name] = type_loss(outputs[name], index.long())
    if regression:
        per_col, col_known = ccc_loss_columns(torch.cat([outputs[n] for n in regression], -1),
                                              torch.cat([aligned[n] for n in regression], -1))
        start = 0
        for name in regression:
            width = tasks[name].out_dim
            part, part_known = per_col[..., start:start + width], col_known[..., start:start + width]
            losses[name] = (part * part_known).sum(-1) / part_known.sum(-1).clamp_min(1.0)
            start += width
    return torch.stack([losses[n] for n in names], dim=-1)
