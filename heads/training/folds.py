"""Speaker-independent folds for stage-2 cross-validation.

`assign_folds` puts every clip in one of K folds so that no group (speaker) is in two folds; with a
stratification label (a classification task's class index) the folds also keep the class proportions close
(`StratifiedGroupKFold`). Fold k is then run as an ordinary Train/Val/Test split (`splits_for_fold`):

    eval fold   = k             -> "Test" (predicted, scored out of fold)
    select fold = (k + 1) mod K -> "Val"  (best epoch, LR plateau)
    train folds = the others    -> "Train"

so the training code that trains on Train, selects on Val and predicts Test runs one fold unchanged, and
every clip is predicted exactly once over the K folds. K must therefore be at least 3.

A clip with an empty group ("") is a group of its own. The grouping without a stratification label is done
here (a seeded shuffle of the groups, then the largest first into the smallest fold), not by sklearn's
GroupKFold, whose shuffling exists only in recent versions: the same seed gives the same folds on every
supported scikit-learn.
"""
from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.command_kit.atomic import write_text_atomic
from cache.command_kit.errors import AvbError

FOLDS_HEADER = ("id", "group", "fold")
CV_ROUND = "cv_round"   # the cache-view attribute (and run config key) naming a cross-validation round


class FoldError(AvbError):
    """Folds that cannot be made or read (too few groups, too few folds, a bad folds file)."""


def _group_codes(groups: Sequence[str]) -> np.ndarray:
    """An integer per clip, equal for clips of one group; each clip with an empty group gets its own."""
    codes = np.empty(len(groups), dtype=np.int64)
    named: dict[str, int] = {}
    next_code = 0
    for i, group in enumerate(groups):
        group = "" if group is None else str(group)
        if group and group in named:
            codes[i] = named[group]
            continue
        codes[i] = next_code
        if group:
            named[group] = next_code
        next_code += 1
    return codes


def _strata(stratify: np.ndarray, n: int) -> np.ndarray:
    """Class labels (any dtype, [N] or [N, 1]) -> small ints; NaN, None and "" form one stratum of their own."""
    labels = np.asarray(stratify)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise FoldError(f"the stratification label has shape {labels.shape}; expected one value per clip ({n})")
    if labels.dtype.kind in "fc":
        known = np.isfinite(labels)
        values = [repr(float(v)) if ok else None for v, ok in zip(labels.real, known)]
    else:
        values = [None if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else str(v)
                  for v in labels.tolist()]
    index = {value: i for i, value in enumerate(sorted({v for v in values if v is not None}))}
    unknown = len(index)
    return np.array([unknown if v is None else index[v] for v in values], dtype=np.int64)


def _grouped_folds(codes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Balanced group folds: groups in a seeded random order, then (stably) largest first, each into the fold
    holding the fewest clips so far (the lowest fold on a tie)."""
    n_groups = int(codes.max()) + 1
    sizes = np.bincount(codes, minlength=n_groups)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += sizes[g]
    return fold_of_group[codes]


def _stratified_folds(codes: np.ndarray, strata: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """StratifiedGroupKFold's folds with the groups in a seeded random order, or None when it cannot split.

    The groups are renumbered by a seeded permutation and split with shuffle=False (whose stable sort then
    keeps that order among equally spread groups): that is what shuffle=True does since scikit-learn 1.6,
    while before it shuffle=True mixed up which class counts belong to which group, which ruined the
    stratification. So every supported version gives the same, stratified, folds.
    """
    # Imported here: sklearn is slow to import and only stratified folds need it.
    from sklearn.model_selection import StratifiedGroupKFold

    shuffled = np.random.default_rng(seed).permutation(int(codes.max()) + 1)[codes]
    folds = np.full(len(codes), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=False)
    with warnings.catch_warnings():   # "The least populated class in y has only n members": fine for strata
        warnings.simplefilter("ignore", UserWarning)
        try:
            for fold, (_, test) in enumerate(splitter.split(np.zeros(len(codes)), strata, shuffled)):
                folds[test] = fold
        except ValueError:   # e.g. every class has fewer members than folds, or a single stratum
            return None
    return folds


def assign_folds(groups: Sequence[str], k: int, *, stratify: np.ndarray | None = None, seed: int = 0,
                 column: str = "group") -> np.ndarray:
    """The fold (0..k-1) of every clip: no group in two folds, every fold non-empty, deterministic by `seed`.

    `stratify` (one class label per clip; NaN / "" = unknown, a stratum of its own) balances the class
    proportions across folds; `column` names the group column in the error messages.
    """
    k = int(k)
    if k < 2:
        raise FoldError(f"--folds must be at least 2, got {k}")
    if len(groups) == 0:
        raise FoldError("no clips to assign to folds")
    codes = _group_codes(groups)
    n_groups = int(codes.max()) + 1
    if n_groups < 2:
        raise FoldError(f"group column '{column}' has one group; --folds needs at least 2")
    if k > n_groups:
        raise FoldError(f"--folds {k} asks for more folds than the {n_groups} groups in column '{column}'")
    if stratify is not None:
        folds = _stratified_folds(codes, _strata(stratify, len(codes)), k, seed)
        if folds is not None and folds.min() >= 0 and len(np.unique(folds)) == k:
            return folds
    # No label, or one that StratifiedGroupKFold cannot split on, or a split that left a fold empty (too few
    # groups for its greedy balancing): balanced group folds without stratification.
    return _grouped_folds(codes, k, seed)


def plan_folds(groups: Sequence[str], tasks: Any, labels: Mapping[str, np.ndarray], k: int, *, seed: int = 0,
               column: str = "group") -> np.ndarray:
    """The folds of a corpus (stage 1) or of its cache (stage 2), the same for both: the labelled clips by group
    (every clip a group of its own when `groups` is empty), stratified by the first classification task of
    `tasks`; a clip without any label (an unlabelled Test row) is in no fold (-1)."""
    n = len(next(iter(labels.values()))) if labels else len(groups)
    known = np.zeros(n, dtype=bool)
    for task in tasks:
        values = np.asarray(labels[task.name], dtype=np.float64).reshape(n, -1)
        known |= ~np.isnan(values).all(axis=1)
    rows = np.flatnonzero(known)
    if len(rows) == 0:
        raise FoldError("no clip has a label to cross-validate on")
    groups = list(groups) if len(groups) else [""] * n
    strat = next((np.asarray(labels[t.name])[rows] for t in tasks if t.is_classification), None)
    folds = np.full(n, -1, dtype=np.int64)
    folds[rows] = assign_folds([groups[i] for i in rows], k, stratify=strat, seed=seed, column=column)
    return folds


def cache_folds(cache: Any, k: int, seed: int = 0) -> np.ndarray:
    """The fold of every clip of a whole cache (by its clip_info/group), the assignment `avb finetune --folds K`
    makes on the corpus the cache was dumped from."""
    from heads.tasks import tasks_of  # noqa: PLC0415

    groups = cache.clip_info.get("group")
    tasks = tasks_of(cache.attrs, str(cache.path))
    return plan_folds([] if groups is None else [str(g) for g in groups], tasks, cache.labels, k, seed=seed)


def round_view(cache: Any, folds: np.ndarray, fold: int, k: int, seed: int = 0) -> Any:
    """The cache as round `fold` sees it: Train = training folds, Val = select fold, Test = eval fold; its
    attributes say which round (CV_ROUND), and a run trained on it records that in its config.json."""
    from dataclasses import replace  # noqa: PLC0415

    return replace(cache, splits=splits_for_fold(folds, fold, k),
                   attrs={**cache.attrs, CV_ROUND: {"folds": int(k), "fold": int(fold), "seed": int(seed)}})


def apply_round(cache: Any, cv_round: Mapping[str, Any]) -> Any:
    """A whole cache -> the view of the round a run recorded (`CV_ROUND`), for readers of that run."""
    try:
        k, fold, seed = int(cv_round["folds"]), int(cv_round["fold"]), int(cv_round["seed"])
    except (KeyError, TypeError, ValueError):
        raise FoldError(f"not a cross-validation round: {cv_round!r}") from None
    return round_view(cache, cache_folds(cache, k, seed), fold, k, seed)


def fold_roles(fold: int, k: int) -> tuple[list[int], int, int]:
    """(train folds, select fold, eval fold) of cross-validation round `fold` of `k`: eval = fold,
    select = (fold + 1) mod k, train = the rest (ascending)."""
    fold, k = int(fold), int(k)
    if k < 3:
        raise FoldError(f"--folds {k} leaves no fold to train on (one fold selects, one is evaluated); "
                        "K must be >= 3")
    if not 0 <= fold < k:
        raise FoldError(f"fold {fold} is not one of 0..{k - 1}")
    select = (fold + 1) % k
    return [f for f in range(k) if f not in (fold, select)], select, fold


def splits_for_fold(folds: np.ndarray, fold: int, k: int) -> np.ndarray:
    """Each clip's split for round `fold`: "Train" (train folds), "Val" (select fold) or "Test" (eval fold)."""
    _, select, evaluate = fold_roles(fold, k)
    folds = np.asarray(folds)
    if folds.size and (folds.min() < -1 or folds.max() >= k):
        raise FoldError(f"fold numbers must lie in 0..{k - 1} (or -1: in no fold), got "
                        f"{int(folds.min())}..{int(folds.max())}")
    out = np.full(folds.shape, "Train", dtype="<U5")
    out[folds == -1] = ""            # in no fold: neither trained, selected nor scored on
    out[folds == select] = "Val"
    out[folds == evaluate] = "Test"
    return out


def write_folds_csv(path: str | os.PathLike, ids: Sequence[str], groups: Sequence[str],
                    folds: np.ndarray) -> None:
    """Write `id,group,fold` (one row per clip, in the given order) atomically."""
    folds = np.asarray(folds)
    if not len(ids) == len(groups) == len(folds):
        raise FoldError(f"{path}: {len(ids)} ids, {len(groups)} groups and {len(folds)} folds do not align")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FOLDS_HEADER)
    writer.writerows([str(i), "" if g is None else str(g), int(f)] for i, g, f in zip(ids, groups, folds))
    write_text_atomic(path, out.getvalue())


def read_folds_csv(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, groups, folds) from a file `write_folds_csv` wrote; one-line errors name the file and row."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        raise FoldError(f"{path}: cannot read the folds file ({err.strerror or err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise FoldError(f"{path}: not a folds CSV ({err})") from None
    if not rows or tuple(c.strip() for c in rows[0]) != FOLDS_HEADER:
        raise FoldError(f"{path}: the header must be {','.join(FOLDS_HEADER)}")
    ids: list[str] = []
    groups: list[str] = []
    folds: list[int] = []
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 3:
            raise FoldError(f"{path}, row {line}: expected 3 cells (id,group,fold), got {len(row)}")
        clip_id, group, fold = (cell.strip() for cell in row)
        if not clip_id or clip_id in seen:
            raise FoldError(f"{path}, row {line}: id {clip_id!r} is empty or repeated")
        try:
            value = int(fold)
        except ValueError:
            value = -1
        if value < 0:
            raise FoldError(f"{path}, row {line} (id {clip_id}): fold {fold!r} is not a non-negative integer")
        seen.add(clip_id)
        ids.append(clip_id)
        groups.append(group)
        folds.append(value)
    return ids, groups, np.array(folds, dtype=np.int64)
