"""Percentile-bootstrap confidence intervals of the challenge scores, and paired comparisons between systems.

Why: a Val score of .5618 against .5560 says nothing until one knows how much the score moves when the Val
clips are drawn again. The bootstrap answers that without any assumption on the metric: resample the split's
clips with replacement, rescore, and read the interval off the percentiles of the resampled scores.

How it stays fast (1,000 resamples of 19,396 Val clips in seconds): a resample only changes how often each
clip counts, so every metric is a function of count-weighted sums. Resample b is a vector of counts c_b [N]
(how often each clip was drawn); for a block of resamples the counts form a matrix C [B, N], and one matrix
product C @ M, where M holds per-clip columns (labels, predictions, their squares and products; one-hot
classes, predicted classes and hits for UAR, accuracy and macro-F1), gives every weighted sum of every resample at once. CCC and Pearson follow from
the weighted moments (centred on the full-sample means first, so the float64 sums do not cancel), UAR from
per-class hit, prediction and clip counts. The result equals scoring each resampled split with `heads.metrics`, which is
what the tests check against a plain loop.

Resample b of seed s draws its indices with `np.random.default_rng([s, b]).integers(0, N, N)`
(`resample_indices`): reproducible, independent of block sizes, and the same for every task and every system
scored with the same seed -- which is what makes a comparison *paired*: two systems are compared on exactly
the same resampled sets of clips.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cache.command_kit.errors import AvbError
from heads.analysis.threads import limited_threads
from heads.metrics import EPS, class_indices, labelled_rows
from heads.tasks import SELECTION_KEY, Task, TaskSet

DEFAULT_LEVEL = 0.95
DEFAULT_N_BOOT = 1000
BLOCK_CELLS = 4_000_000   # resamples per block x clips: bounds the float64 count matrix to ~32 MB


class BootstrapError(AvbError):
    """Bad bootstrap settings or inputs (one line for the user)."""


@dataclass(frozen=True)
class BootstrapConfig:
    """How intervals are computed: confidence level, number of resamples, seed of the resamples."""

    level: float = DEFAULT_LEVEL
    n_boot: int = DEFAULT_N_BOOT
    seed: int = 0
    threads: int = 1    # BLAS threads of the matrix products (heads.analysis.threads: one is fastest on a busy machine)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.level) < 1.0:
            raise BootstrapError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {self.level}")
        if int(self.n_boot) < 1:
            raise BootstrapError(f"the number of resamples must be >= 1, got {self.n_boot}")

    def to_dict(self) -> dict[str, float | int | str]:
        return {"level": float(self.level), "n_boot": int(self.n_boot), "seed": int(self.seed),
                "method": "percentile bootstrap over clips"}


def resample_indices(n: int, b: int, seed: int = 0) -> np.ndarray:
    """Indices (into the split's n clips) of resample number `b`: n draws with replacement."""
    return np.random.default_rng([int(seed), int(b)]).integers(0, n, n)


def resample_group_counts(codes: np.ndarray, start: int, stop: int, seed: int = 0) -> np.ndarray:
    """The cluster bootstrap: resample b draws the G groups (codes 0..G-1, one per clip) with replacement,
    `np.random.default_rng([seed, b]).integers(0, G, G)`, and a clip counts as often as its group was drawn:
    float64 [stop - start, n]. Clips of one speaker are not independent; resampling them one by one would
    give intervals that are too narrow."""
    codes = np.asarray(codes, dtype=np.int64)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    drawn = np.stack([np.bincount(resample_indices(n_groups, b, seed), minlength=n_groups)
                      for b in range(start, stop)])
    return drawn[:, codes].astype(np.float64)


def resample_counts(n: int, start: int, stop: int, seed: int = 0) -> np.ndarray:
    """How often each clip is drawn in resamples start..stop-1: float64 [stop - start, n]."""
    idx = np.stack([resample_indices(n, b, seed) for b in range(start, stop)])
    flat = idx + (np.arange(stop - start) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=(stop - start) * n).reshape(stop - start, n).astype(np.float64)


# ------------------------------------------------------------------------------------------- per task

class _TaskSums:
    """The per-clip columns of one task and one system, and how its score is read from their weighted sums."""

    def __init__(self, task: Task, labels: np.ndarray, preds: np.ndarray) -> None:
        self.task, self.name = task, task.name
        labels = np.asarray(labels, dtype=np.float64)
        labels = labels[:, None] if labels.ndim == 1 else labels
        keep = labelled_rows(task, labels).astype(np.float64)        # unlabelled clips weigh 0
        if task.is_classification:
            truth = np.where(keep > 0, np.nan_to_num(labels[:, 0]), -1).astype(np.int64)
            guess = class_indices(preds)
            classes = np.arange(len(task.classes))[None, :]
            onehot = (truth[:, None] == classes).astype(np.float64)
            guessed = (guess[:, None] == classes) * keep[:, None]
            self.columns = np.hstack([onehot, onehot * (guess == truth)[:, None], guessed])   # [N, 3C]
            self.k = len(task.classes)
        else:
            y = np.where(keep[:, None] > 0, labels, 0.0)
            p = np.asarray(preds, dtype=np.float64)
            p = (p[:, None] if p.ndim == 1 else p) * keep[:, None]
            w = max(keep.sum(), 1.0)
            y_mean, p_mean = y.sum(0) / w, p.sum(0) / w
            self.offset = y_mean - p_mean                                 # restores mean_y - mean_p below
            y = (y - y_mean) * keep[:, None]                               # centred on the labelled rows' means
            p = (p - p_mean) * keep[:, None]
            self.columns = np.hstack([keep[:, None], y, p, y * y, p * p, y * p])   # [N, 1 + 5k]
            self.k = y.shape[1]

    def scores(self, sums: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of each resample from its weighted column sums [B, width]."""
        k = self.k
        if self.task.is_classification:
            clips, hits, guessed = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:]
            present = clips > 0
            n_present = np.maximum(present.sum(1), 1)
            recall = np.where(present, hits / np.where(present, clips, 1.0), 0.0)
            f1 = np.where(present, 2.0 * hits / np.where(present, clips + guessed, 1.0), 0.0)
            return {f"{self.name}_uar": recall.sum(1) / n_present,
                    f"{self.name}_accuracy": hits.sum(1) / np.maximum(clips.sum(1), 1.0),
                    f"{self.name}_f1": f1.sum(1) / n_present}
        w = np.maximum(sums[:, :1], 1.0)
        my, mp = sums[:, 1:1 + k] / w, sums[:, 1 + k:1 + 2 * k] / w
        vy = sums[:, 1 + 2 * k:1 + 3 * k] / w - my ** 2
        vp = sums[:, 1 + 3 * k:1 + 4 * k] / w - mp ** 2
        cov = sums[:, 1 + 4 * k:1 + 5 * k] / w - my * mp
        vy, vp = np.maximum(vy, 0.0), np.maximum(vp, 0.0)
        ccc = 2.0 * cov / (vy + vp + (my - mp + self.offset) ** 2 + EPS)
        denom = w * np.sqrt(vy * vp)     # = sqrt(sum tc^2 * sum pc^2), as heads.metrics compares it to EPS
        pearson = np.where(denom > EPS, w * cov / np.maximum(denom, EPS), 0.0)
        return {f"{self.name}_ccc": ccc.mean(1), f"{self.name}_pearson": pearson.mean(1)}


def score_distributions(tasks: TaskSet, labels: Mapping[str, np.ndarray],
                        systems: Sequence[Mapping[str, np.ndarray]],
                        config: BootstrapConfig = BootstrapConfig(),
                        groups: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """For each system, score key -> its [n_boot] resampled scores (see `_score_distributions`); with
    `groups` (an integer code per clip) whole groups are resampled (`resample_group_counts`)."""
    with limited_threads(config.threads, torch_threads=False):
        return _score_distributions(tasks, labels, systems, config, groups)


def _score_distributions(tasks: TaskSet, labels: Mapping[str, np.ndarray],
                         systems: Sequence[Mapping[str, np.ndarray]],
                         config: BootstrapConfig, groups: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """For each system (predictions per task, rows = the same N clips as `labels`): score key -> [n_boot]
    array of that score on every resample. Every task and every system sees the same resamples; `mean` (of
    the headline scores) is included when a system predicts every task.

    The resample counts are drawn once per block and reused for every system. Each system's sums come from a
    matrix product of its own columns only (same shapes whatever else is scored): a BLAS kernel may sum in a
    different order for a wider matrix, so a product over several systems' columns would make a run's
    figures depend on which runs were scored beside it (a grown grid would change its finished rows).
    """
    if not systems:
        return []
    names = [n for n in tasks.names if n in systems[0]]
    for i, system in enumerate(systems):
        if [n for n in tasks.names if n in system] != names:
            raise BootstrapError(f"system {i} predicts other tasks than system 0; a paired bootstrap needs the same")
    if not names:
        raise BootstrapError("no task predictions to bootstrap")
    n = len(np.asarray(labels[names[0]]))
    for name in names:
        for system in systems:
            if len(np.asarray(labels[name])) != n or len(np.asarray(system[name])) != n:
                raise BootstrapError(f"{tasks[name].title}: labels and predictions must cover the same {n} clips")
    if n == 0:
        raise BootstrapError("no clips to resample")
    if groups is not None and len(groups) != n:
        raise BootstrapError(f"{len(groups)} group codes for {n} clips")
    block = max(1, BLOCK_CELLS // n)
    out: list[dict[str, list[np.ndarray]]] = [{} for _ in systems]
    for start in range(0, config.n_boot, block):
        stop = min(config.n_boot, start + block)
        counts = (resample_counts(n, start, stop, config.seed) if groups is None
                  else resample_group_counts(groups, start, stop, config.seed))
        for s, system in enumerate(systems):
            parts = [_TaskSums(tasks[name], labels[name], system[name]) for name in names]
            matrix = np.hstack([t.columns for t in parts])
            bounds = np.cumsum([0] + [t.columns.shape[1] for t in parts])
            sums = counts @ matrix
            for j, t in enumerate(parts):
                for key, values in t.scores(sums[:, bounds[j]:bounds[j + 1]]).items():
                    out[s].setdefault(key, []).append(values)
    result = []
    for dist in out:
        merged = {key: np.concatenate(dist[key]) for key in tasks.metric_keys if key in dist}
        if len(names) == len(tasks):
            merged[SELECTION_KEY] = np.mean([merged[task.headline_key] for task in tasks], axis=0)
        result.append(merged)
    return result


def percentile_interval(values: np.ndarray, level: float) -> list[float]:
    """[low, high]: the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled scores."""
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(low), float(high)]


def intervals(distributions: Mapping[str, np.ndarray], level: float) -> dict[str, list[float]]:
    """score key -> [low, high] for every resampled score."""
    return {key: percentile_interval(values, level) for key, values in distributions.items()}


def score_intervals(tasks: TaskSet, labels: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray],
                    config: BootstrapConfig = BootstrapConfig(), groups: np.ndarray | None = None
                    ) -> dict[str, list[float]]:
    """score key -> [low, high] of one system's predictions (resampling whole `groups` when given)."""
    return intervals(score_distributions(tasks, labels, [preds], config, groups)[0], config.level)


def with_intervals(scores: Mapping[str, float], cis: Mapping[str, list[float]]) -> dict[str, float | list[float]]:
    """The scores with `<key>_ci` = [low, high] right after each `<key>` that has an interval."""
    out: dict[str, float | list[float]] = {}
    for key, value in scores.items():
        out[key] = value
        if key in cis:
            out[f"{key}_ci"] = list(cis[key])
    return out


def win_fraction(challenger: np.ndarray, reference: np.ndarray) -> float:
    """Paired bootstrap: the fraction of resamples on which `challenger` scores higher than `reference`, a tie
    counting half (two systems with identical predictions get 0.5, not 0).

    Both arrays must come from the same resamples (the same seed). A small fraction (say < 0.025) means the
    reference is better on nearly every redraw of the clips: the difference is unlikely to be luck.
    """
    challenger, reference = np.asarray(challenger), np.asarray(reference)
    if challenger.shape != reference.shape:
        raise BootstrapError(f"paired comparison needs equal resample counts, got {challenger.shape} and "
                             f"{reference.shape}")
    return float(np.mean(challenger > reference) + 0.5 * np.mean(challenger == reference))
