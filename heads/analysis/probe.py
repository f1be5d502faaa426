"""`avb probe`: a linear probe of every cached layer for every task -- which layer of the backbone knows what.

For each pooled layer of a cache and each of its tasks (the cache's `tasks` attribute; A-VB's four for a cache
without one), a linear model is fitted on Train and scored on Val with the task's own metric: multinomial logistic
regression for a classification task (UAR; A-VB's TYPE), ridge regression for a regression task (mean CCC,
Pearson's r beside it; A-VB's TWO, HIGH and CULTURE). Features are standardised with the Train mean and standard
deviation. What a probe says is how *linearly* a layer encodes a task, the usual first look at a new backbone (and the
question s3prl, emotion2vec and nkululeko users keep asking); it is no substitute for the heads.

Why closed form: the probe must stay seconds at demo size and minutes at HUME-VB size (59k clips, 14 layers),
so no loop of solver calls. Ridge: one eigendecomposition of the Train Gram matrix X'X per layer serves every
target column and every regularisation strength; the strength is chosen per task by generalised
cross-validation (GCV, Golub, Heath & Wahba 1979), which is also closed form in the eigenbasis: for a strength
lam with filter f_k = 1 / (s_k + lam) over the eigenvalues s_k and B = V'X'Y,
    RSS(lam) = |Y|^2 - 2 sum_k f_k B_k^2 + sum_k s_k f_k^2 B_k^2,   df(lam) = sum_k s_k f_k,
    GCV(lam) = RSS / n / (1 - (df + 1) / n)^2        (+1: the unpenalised intercept),
minimised over a grid of strengths relative to the mean eigenvalue. Classification: full-batch L-BFGS on the
mean cross-entropy with balanced class weights (the metric is UAR, so every class counts alike) plus an L2
penalty, whose strength C is chosen by the UAR on a held-out fifth of Train (`_probe_classification`), then
refitted on all of Train. Measured costs at HUME-VB size are in the README (`tests/benchmarks/bench_probe.py`).
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.atomic import write_json_atomic, write_text_atomic
from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.jsonable import jsonable
from cache.command_kit.options import progress_option
from heads.analysis.threads import limited_threads
from heads.metrics import labelled_rows, score_task, score_text
from heads.runs import PROBE_CSV, PROBE_JSON, PROBE_MD
from heads.tasks import Task, TaskSet, tasks_of

PROBE_FILES = (PROBE_CSV, PROBE_JSON, PROBE_MD)
CSV_FIELDS = ("layer", "task", "metric", "val_score")
# Ridge strengths as multiples of the mean eigenvalue of the Train Gram matrix (~ n for standardised
# features), in quarter decades. Classification: inverse L2 strengths C as sklearn defines them (objective
# sum_i w_i CE_i + |W|^2 / (2 C)), so a C means the same prior on a subsample and on all of Train.
RIDGE_GRID: tuple[float, ...] = tuple(float(10.0 ** (e / 4)) for e in range(-24, 9))
LOGISTIC_C_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class ProbeError(AvbError):
    """A cache or setting the probe cannot work with; one line naming it."""


@dataclass
class ProbeConfig:
    """What to probe and how; defaults probe every pooled layer for every task of the cache."""

    layers: tuple[str, ...] = ()            # empty: every pooled layer of the cache
    tasks: tuple[str, ...] = ()             # empty: every task of the cache (its `tasks` attribute)
    ridge_grid: tuple[float, ...] = RIDGE_GRID
    logistic_c_grid: tuple[float, ...] = LOGISTIC_C_GRID
    holdout: float = 0.2                    # fraction of Train that scores a classification task's C candidates
    select_rows: int = 6000                 # at most this many of the other Train rows fit the candidates
    max_iter: int = 50                      # L-BFGS iterations per logistic fit
    seed: int = 0                           # the holdout split
    threads: int = 1                        # BLAS and torch threads (heads.analysis.threads; 0: the libraries' own)

    def validate(self) -> None:
        """The settings that do not depend on the cache (`task_names` checks the tasks against it)."""
        if not 0.0 < self.holdout < 1.0:
            raise ProbeError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.max_iter < 1:
            raise ProbeError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.ridge_grid or not self.logistic_c_grid or min(self.ridge_grid + self.logistic_c_grid) <= 0:
            raise ProbeError("the regularisation grids must be non-empty and positive")
        if self.select_rows < 2:
            raise ProbeError(f"select_rows must be >= 2, got {self.select_rows}")

    def task_names(self, tasks: TaskSet) -> tuple[str, ...]:
        """The tasks to probe as the cache names them (any case accepted), in the order asked; all when empty."""
        if not self.tasks:
            return tasks.names
        names = []
        for name in self.tasks:
            if name not in tasks:
                raise ProbeError(f"unknown task {name!r}; expected some of {', '.join(tasks.names)}")
            if tasks[name].name in names:
                raise ProbeError(f"task {tasks[name].name!r} is listed twice")
            names.append(tasks[name].name)
        return tuple(names)


# ------------------------------------------------------------------------------------------------ ridge

@dataclass
class RidgeFit:
    """The eigendecomposition of one design matrix, from which every strength's solution follows."""

    eigvals: np.ndarray     # s [d], eigenvalues of Xc'Xc (>= 0)
    eigvecs: np.ndarray     # V [d, d]
    proj: np.ndarray        # B = V' Xc' Yc [d, T]
    sq_norms: np.ndarray    # |Yc_j|^2 [T]
    x_mean: np.ndarray      # [d]
    y_mean: np.ndarray      # [T]
    n: int


def ridge_decompose(x: np.ndarray, y: np.ndarray) -> RidgeFit:
    """Centre X and Y (an unpenalised intercept) and decompose X'X once (float64).

    The centred Gram matrix is formed as X'X - n m m' rather than from a centred copy of X: for the
    standardised features the probe passes (m ~ 0) nothing cancels, and a HUME-VB layer's copy is 120 MB.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    yc = y - y_mean
    s, v = np.linalg.eigh(x.T @ x - len(x) * np.outer(x_mean, x_mean))
    s = np.clip(s, 0.0, None)
    return RidgeFit(s, v, v.T @ (x.T @ yc), (yc ** 2).sum(0), x_mean, y_mean, len(x))


def gcv(fit: RidgeFit, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RSS [L, T] per strength and target column, GCV denominator [L]) in closed form (module docstring)."""
    f = 1.0 / (fit.eigvals[:, None] + lambdas[None, :])                 # [d, L]
    b2 = fit.proj ** 2                                                  # [d, T]
    rss = fit.sq_norms[None, :] - 2.0 * (f.T @ b2) + ((fit.eigvals[:, None] * f ** 2).T @ b2)
    df = (fit.eigvals[:, None] * f).sum(0) + 1.0                        # +1: the intercept
    denom = fit.n * np.maximum(1.0 - df / fit.n, 1e-12) ** 2
    return np.maximum(rss, 0.0), denom


def ridge_weights(fit: RidgeFit, lam: float, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W [d, k], intercept [k]) of strength `lam` for target `columns`: predict with x @ W + intercept."""
    w = fit.eigvecs @ (fit.proj[:, columns] / (fit.eigvals + lam)[:, None])
    return w, fit.y_mean[columns] - fit.x_mean @ w


# --------------------------------------------------------------------------------------------- logistic

def fit_logistic(x: Any, y: Any, lam: float, n_classes: int, *, init: Any = None, max_iter: int = 50) -> Any:
    """Multinomial logistic regression by full-batch L-BFGS (torch, float32): W [d + 1, C], the last row the
    unpenalised bias. Minimises mean_i w_i CE_i + lam / 2 |W[:-1]|^2 with balanced weights w_i = n / (K n_c),
    K the classes present: the objective of sklearn's LogisticRegression(class_weight="balanced",
    C = 1 / (lam n)) divided by n.

    The gradient is written out (softmax minus the weighted one-hot targets, then X' times that) instead of
    taken by autograd, and X' is kept contiguous: both matrix products then stream the features once each,
    which is what an evaluation costs at HUME-VB size (20k x 768).
    """
    import torch  # noqa: PLC0415

    x = torch.as_tensor(x, dtype=torch.float32).contiguous()
    xt = x.t().contiguous()
    y = torch.as_tensor(y, dtype=torch.long)
    counts = torch.bincount(y, minlength=n_classes).double()
    present = int((counts > 0).sum())
    weights = (len(y) / (present * counts.clamp(min=1.0)))[y].float() / len(y)       # sums to 1
    targets = torch.nn.functional.one_hot(y, n_classes).float() * weights[:, None]   # [n, C]
    d = x.shape[1]
    w = (torch.zeros(d + 1, n_classes) if init is None else torch.as_tensor(init, dtype=torch.float32).clone())
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), history_size=20,
                            tolerance_grad=1e-5, tolerance_change=1e-6, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        coef, bias = w[:-1], w[-1]
        log_p = torch.log_softmax(torch.addmm(bias, x, coef), -1)
        loss = -(targets * log_p).sum() + 0.5 * lam * (coef * coef).sum()
        resid = torch.exp(log_p) * weights[:, None] - targets                       # d loss / d logits
        w.grad = torch.cat([torch.addmm(coef, xt, resid, alpha=1.0, beta=lam), resid.sum(0, keepdim=True)])
        return loss

    opt.step(closure)
    return w.detach()


def logistic_predict(x: Any, w: Any) -> np.ndarray:
    """Class probabilities [N, C] of `fit_logistic`'s weights."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        logits = torch.addmm(w[-1], torch.as_tensor(x, dtype=torch.float32), w[:-1])
        return torch.softmax(logits, -1).numpy()


# ------------------------------------------------------------------------------------------------ probe

@dataclass
class LayerScores:
    """One layer's Val scores per task and the regularisation the probe chose."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)   # task -> {metric: value}
    chosen: dict[str, float] = field(default_factory=dict)              # task -> ridge strength / logistic C


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """float64 copies standardised with the Train mean and std (in place on the copies: a HUME-VB layer is
    120 MB in float64, and every temporary costs as much as the arithmetic)."""
    out = [np.array(a, dtype=np.float64) for a in (train, *others)]
    mean = out[0].mean(0)
    out[0] -= mean
    std = np.sqrt(np.einsum("ij,ij->j", out[0], out[0]) / max(len(out[0]), 1))
    std = np.where(std > 1e-8, std, 1.0)      # a constant feature becomes 0, not NaN
    out[0] /= std
    for a in out[1:]:
        a -= mean
        a /= std
    return out


def probe_layer(x_train: np.ndarray, train_labels: dict[str, np.ndarray], x_val: np.ndarray,
                val_labels: dict[str, np.ndarray], tasks: Iterable[Task], cfg: ProbeConfig | None = None
                ) -> LayerScores:
    """Fit the probes of one layer's features on Train and score them on Val, for each of `tasks` (any kinds;
    `cfg` gives the regularisation grids and the holdout, its `tasks` is not read here)."""
    cfg = cfg or ProbeConfig()
    tasks = list(tasks)
    xt, xv = _standardise(x_train, x_val)
    out = LayerScores()
    # Regression tasks with the same labelled Train rows share one decomposition (all of them, in A-VB).
    groups: dict[bytes, list[Task]] = {}
    for task in tasks:
        if not task.is_classification:
            groups.setdefault(labelled_rows(task, train_labels[task.name]).tobytes(), []).append(task)
    for key, members in groups.items():
        keep = np.frombuffer(key, dtype=bool)
        y = np.hstack([np.asarray(train_labels[t.name], np.float64).reshape(len(keep), -1)[keep] for t in members])
        fit = ridge_decompose(xt[keep], y)
        lambdas = np.asarray(cfg.ridge_grid) * max(float(fit.eigvals.mean()), 1e-12)
        rss, denom = gcv(fit, lambdas)
        start = 0
        for task in members:
            cols = np.arange(start, start + task.label_dim)
            start += len(cols)
            best = int(np.argmin(rss[:, cols].sum(1) / denom))     # ties: the weakest strength listed first
            w, b = ridge_weights(fit, float(lambdas[best]), cols)
            out.scores[task.name] = _metric_names(score_task(task, val_labels[task.name], xv @ w + b))
            out.chosen[task.name] = float(lambdas[best])
    for task in tasks:
        if task.is_classification:
            out.scores[task.name], out.chosen[task.name] = _probe_classification(
                task, xt, train_labels[task.name], xv, val_labels[task.name], cfg)
    return out


def _probe_classification(task: Task, xt: np.ndarray, labels: np.ndarray, xv: np.ndarray, val_labels: np.ndarray,
                          cfg: ProbeConfig) -> tuple[dict[str, float], float]:
    """A classification task's probe; returns its Val score (UAR only, the probe's one metric per
    classification task) and the chosen C.

    C is chosen like sklearn's LogisticRegressionCV chooses it (fit on part of Train, score, refit on all of
    Train with the same C), with two economies that matter at HUME-VB size: the candidates are fitted on at
    most `select_rows` Train rows (C is a fixed prior, so it means the same at any size), and the path runs
    from strong to weak penalties, each fit warm-starting the next, and stops at the first drop of the
    holdout UAR (unimodal in C in practice).
    """
    from heads.metrics import uar  # noqa: PLC0415

    labels = np.asarray(labels).reshape(len(labels), -1)
    keep = labelled_rows(task, labels)
    x, y = xt[keep].astype(np.float32), labels[keep, 0].astype(np.int64)
    n_classes = len(task.classes)
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    n_hold = min(len(y) - 2, max(1, int(round(cfg.holdout * len(y)))))
    hold, fit_rows = order[:n_hold], np.sort(order[n_hold:][:cfg.select_rows])
    x_fit, y_fit, x_hold = x[fit_rows], y[fit_rows], x[hold]
    best, best_score, w = None, -math.inf, None
    candidates = {}
    for c in sorted(cfg.logistic_c_grid):
        w = fit_logistic(x_fit, y_fit, 1.0 / (c * len(y_fit)), n_classes, init=w, max_iter=cfg.max_iter)
        candidates[c] = w
        score = uar(y[hold], logistic_predict(x_hold, w).argmax(1))
        if score > best_score:                                 # ties keep the stronger penalty
            best, best_score = c, score
        elif score < best_score:
            break
    w = fit_logistic(x, y, 1.0 / (best * len(y)), n_classes, init=candidates[best], max_iter=cfg.max_iter)
    scores = _metric_names(score_task(task, val_labels, logistic_predict(xv.astype(np.float32), w)))
    return {task.metric: scores[task.metric]}, best


def _metric_names(scores: dict[str, float]) -> dict[str, float]:
    """{"two_ccc": .5, "two_pearson": .6} -> {"ccc": .5, "pearson": .6} (task names may hold '_': the metric is
    what follows the last one)."""
    return {key.rsplit("_", 1)[1]: float(value) for key, value in scores.items()}


@dataclass
class ProbeResult:
    cache: str
    backbone: dict[str, Any]
    layers: list[str]
    tasks: list[str]
    n_train: int
    n_val: int
    scores: dict[str, dict[str, dict[str, float]]]     # layer -> task -> {metric: value}
    chosen: dict[str, dict[str, float]]                # layer -> task -> ridge strength lambda / logistic C
    config: dict[str, Any]
    task_set: TaskSet                                  # the cache's tasks (`tasks` names those probed)
    seconds: float = 0.0

    def best(self) -> dict[str, dict[str, Any]]:
        """Per task: the layer with the highest headline score (ties: the earlier layer)."""
        out = {}
        for task in self.tasks:
            metric = self.task_set[task].metric
            layer = max(self.layers, key=lambda name: (self.scores[name][task][metric], -self.layers.index(name)))
            out[task] = {"layer": layer, "metric": metric, "val_score": self.scores[layer][task][metric]}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"cache": self.cache, "backbone": self.backbone, "layers": self.layers, "tasks": self.tasks,
                "n_train": self.n_train, "n_val": self.n_val, "best": self.best(), "scores": self.scores,
                "regularisation": self.chosen, "config": self.config, "task_set": self.task_set.to_json(),
                "method": {"standardisation": "Train mean and std per feature",
                           "regression": "ridge; strength per task by closed-form GCV on Train",
                           "classification": "multinomial logistic regression, balanced class weights, L-BFGS; C "
                                             "(sklearn's inverse L2 strength) by UAR on a held-out part of Train, "
                                             "then refitted on all of Train",
                           "regularisation": "ridge: lambda on the centred, standardised features; "
                                             "classification: C"}}


def run_probe(cache_path: str | os.PathLike, cfg: ProbeConfig | None = None, *, progress: bool = True) -> ProbeResult:
    """Probe every requested layer for every requested task; one layer in memory at a time."""
    cfg = cfg or ProbeConfig()
    cfg.validate()
    with limited_threads(cfg.threads):
        return _run_probe(cache_path, cfg, progress)


def _run_probe(cache_path: str | os.PathLike, cfg: ProbeConfig, progress: bool) -> ProbeResult:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from cache.reader import load_cache, read_attrs  # noqa: PLC0415

    started = time.perf_counter()
    attrs = read_attrs(cache_path)
    task_set = tasks_of(attrs, str(cache_path))
    names = cfg.task_names(task_set)
    tasks = [task_set[name] for name in names]
    layers = list(cfg.layers) or list(attrs["layers"])
    unknown = [layer for layer in layers if layer not in attrs["layer_dims"]]
    if unknown:
        raise ProbeError(f"{cache_path} has no layer {unknown[0]!r}; it holds {', '.join(attrs['layers'])}")
    labels_only = load_cache(cache_path, layers=[], splits=["Train", "Val"])
    missing = [t for t in names if t not in labels_only.labels]
    if missing:
        raise ProbeError(f"{cache_path} has no labels for {', '.join(missing)} (probe other --tasks)")
    for task in tasks:
        _check_labels(cache_path, task, labels_only.labels[task.name])
    train, val = labels_only.indices("Train"), labels_only.indices("Val")
    for split, rows in (("Train", train), ("Val", val)):
        for task in tasks:
            if not labelled_rows(task, labels_only.labels[task.name][rows]).any():
                raise ProbeError(f"{cache_path}: no labelled {split} clips for {task.title}")
    train_labels = {t: np.asarray(labels_only.labels[t][train], np.float64) for t in names}
    val_labels = {t: np.asarray(labels_only.labels[t][val], np.float64) for t in names}
    if len(train) < 3:
        raise ProbeError(f"{cache_path} has {len(train)} Train clip(s); a probe needs at least 3")

    scores: dict[str, dict[str, dict[str, float]]] = {}
    chosen: dict[str, dict[str, float]] = {}
    for layer in tqdm(layers, desc="probe", unit="layer", disable=not progress):
        data = load_cache(cache_path, layers=[layer], splits=["Train", "Val"])
        x = data.pooled[layer]
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
            raise ProbeError(f"cache layer {layer!r} has non-finite features, first clip id {data.ids[bad]}")
        result = probe_layer(x[train], train_labels, x[val], val_labels, tasks, cfg)
        scores[layer] = {t: result.scores[t] for t in names}
        chosen[layer] = {t: result.chosen[t] for t in names}
    backbone = attrs.get("backbone") or {}
    return ProbeResult(
        cache=str(Path(cache_path).resolve()),
        backbone={k: backbone.get(k) for k in ("name_or_path", "model_type")},
        layers=layers, tasks=list(names), n_train=int(len(train)), n_val=int(len(val)), scores=scores,
        chosen=chosen, config=jsonable({**asdict(cfg), "tasks": list(names)}), task_set=task_set,
        seconds=time.perf_counter() - started)


def _check_labels(cache_path: str | os.PathLike, task: Task, labels: np.ndarray) -> None:
    """A label array the task's probe can read: task.label_dim columns, class indices in range."""
    width = labels.shape[1] if labels.ndim == 2 else 1
    if width != task.label_dim:
        raise ProbeError(f"{cache_path}: labels/{task.name} has {width} column(s), task {task.title} expects "
                         f"{task.label_dim}")
    if task.is_classification:
        known = labels[~np.isnan(labels)]
        bad = known[(known < 0) | (known >= len(task.classes)) | (known != np.round(known))]
        if bad.size:
            raise ProbeError(f"{cache_path}: labels/{task.name} holds {bad[0]:g}, not a class index of "
                             f"{task.title} (0..{len(task.classes) - 1})")


# ----------------------------------------------------------------------------------------------- output

def probe_csv(result: ProbeResult) -> str:
    """One row per layer x task with the headline metric, then the task's Pearson row for regression tasks."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for layer in result.layers:
        for task in result.tasks:
            for metric, value in result.scores[layer][task].items():
                writer.writerow([layer, task, metric, repr(float(value))])
    return buf.getvalue()




def probe_markdown(result: ProbeResult) -> str:
    """Layers x tasks (headline metric), the best layer of each task in bold, then the best layers and method."""
    best = result.best()
    tasks = [result.task_set[t] for t in result.tasks]
    heads = [f"{t.title} {t.metric.upper()}" for t in tasks]
    lines = ["| layer | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for layer in result.layers:
        cells = []
        for task in tasks:
            text = score_text(result.scores[layer][task.name][task.metric])
            cells.append(f"**{text}**" if best[task.name]["layer"] == layer else text)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    summary = ", ".join(f"{t.title} {best[t.name]['layer']} ({score_text(best[t.name]['val_score'])})" for t in tasks)

    def short(task: Task) -> str:
        return task.name.upper() if result.task_set.is_avb else task.title

    methods = []
    classification = [short(t) for t in tasks if t.is_classification]
    regression = [short(t) for t in tasks if not t.is_classification]
    if classification:
        methods.append(f"{'/'.join(classification)}: multinomial logistic regression with balanced class weights "
                       "(its C chosen on a held-out fifth of Train), UAR")
    if regression:
        methods.append(f"{'/'.join(regression)}: ridge regression (strength per task by generalised "
                       "cross-validation on Train), mean CCC (Pearson's r in probe.csv)")
    note = (f"Linear probes of {Path(result.cache).name} ({result.backbone.get('model_type') or 'unknown backbone'}): "
            f"fitted on {result.n_train} Train clips, scored on {result.n_val} Val clips. " + "; ".join(methods)
            + ". Best layer per task in bold.")
    return "\n".join(lines) + f"\n\nBest layer per task: {summary}.\n\n{note}\n"


def write_probe(result: ProbeResult, out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProbeError(f"{out}: exists and is not a directory")
    paths = [out / name for name in PROBE_FILES]
    write_text_atomic(paths[0], probe_csv(result))
    write_json_atomic(paths[1], result.to_json())
    write_text_atomic(paths[2], probe_markdown(result))
    return paths


def read_probe(folder: str | os.PathLike) -> dict[str, Any]:
    """probe.json of a probe folder, checked enough to draw it (for `avb report`)."""
    from heads.runs import read_json_object  # noqa: PLC0415

    path = Path(folder) / PROBE_JSON
    data = read_json_object(path)
    for key in ("layers", "tasks", "scores"):
        if key not in data:
            raise ProbeError(f"{path}: no {key!r} (not written by avb probe?)")
    return data


@click.command("probe")
@click.option("--cache", "cache_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HDF5 feature cache written by `avb dump` (or by hand, see cache/FORMAT.md).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for probe.csv, probe.json and probe.md.")
@click.option("--layers", default="", help="Pooled layers to probe, comma-separated (default: all).")
@click.option("--tasks", default="", help="Tasks to probe, comma-separated (default: every task of the cache).")
@click.option("--seed", default=ProbeConfig.seed, show_default=True,
              help="Seeds the Train holdout that picks a classification task's L2 strength.")
@click.option("--threads", default=ProbeConfig.threads, show_default=True, type=click.IntRange(min=0),
              help="BLAS and torch threads (1 is fastest on a busy machine; 0: the libraries' defaults).")
@progress_option("Show a progress bar over the layers.")
def probe_command(cache_path: Path, out: Path, layers: str, tasks: str, seed: int, threads: int,
                  progress: bool) -> None:
    """Linear probes of every pooled layer for every task of the cache: trained on Train, scored on Val with the
    task's own metric (classification: logistic regression, UAR; regression: ridge, CCC). Prints the layer x
    task table and the best layer per task."""
    layer_list = tuple(x.strip() for x in layers.split(",") if x.strip())
    task_list = tuple(x.strip() for x in tasks.split(",") if x.strip())
    with command_errors():
        result = run_probe(cache_path, ProbeConfig(layers=layer_list, tasks=task_list, seed=seed, threads=threads),
                           progress=progress)
        paths = write_probe(result, out)
    click.echo(probe_markdown(result).split("\n\nLinear probes of")[0].rstrip())
    for task, best in result.best().items():
        click.echo(f"best layer for {result.task_set[task].title}: {best['layer']} ({best['metric'].upper()} "
                   f"{best['val_score']:.4f})")
    click.echo(f"probed {len(result.layers)} layers x {len(result.tasks)} tasks in {result.seconds:.1f} s; wrote "
               + ", ".join(str(p) for p in paths))

