"""Train R head runs jointly from a feature cache: one stacked MultiTaskHead, one optimiser step for all.

Why jointly: a run on cached features at batch size 8 is dominated by Python overhead, not arithmetic, so
R runs of one architecture cost about as much as one when their parameters are stacked along a leading run
dim and every step is one batched forward/backward. Joint training must not change any run, so everything
that is random or adaptive is per run: the initial parameters (the head seeds each run's slice), the shuffle
(`np.random.default_rng((seed, epoch))`), the dropout generator, the learning rate and its plateau schedule,
the gradient-norm clipping (`heads.optim`) and the loss weighting (one module per weighting kind, covering
the runs of that kind). The runs' losses are summed before `backward`, which gives each run exactly its own
gradient because no parameter is shared. A run trained alone therefore equals the same run trained jointly.

Selection follows the paper: the validation `mean` of the four headline scores picks the best epoch. The best
epoch's parameters are COPIED (the reference code kept a reference to the live state dict, so its "best"
predictions were the last epoch's) and reloaded at the end; the saved predictions and metrics come from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cache.atomic import atomic_path, write_json_atomic
from cache.format import where
from cache.reader import compat_attrs
from heads.losses import task_losses
from heads.metrics import score_all
from heads.models import HeadConfig, HeadInputs, MultiTaskHead
from heads.optim import PlateauHalving, StackedAdamW
from heads.runs import CONFIG_FILE, HEAD_FILE, METRICS_FILE, RUN_FORMAT
from heads.submission import PROBS_FILE, write_submissions, write_type_probs
from heads.tasks import METRIC_KEYS, TASK_NAMES, TASKS
from heads.weighting import build_weighting

if TYPE_CHECKING:
    from cache.reader import CacheData

# Evaluation chunks hold about this many (row, run) pairs: the activations grow with rows x runs, and on CPU
# mid-sized chunks are also the fastest (measured with 12 runs: 341-row chunks evaluate VANILLA 1.5x and
# BRANCH 1.35x faster than 2048-row chunks, with a tenth of the memory: 0.26 GB instead of 1.2 GB for BRANCH).
EVAL_RUN_ROWS = 4096
EVAL_RUN_ROWS_FRAMES = 256  # the same with frame-level inputs ([B, T, D] per layer and run)
FEATURE_CHECK_ROWS = 8192   # rows per block when checking the features for NaN/inf (bounds the temporary)
SELECTION_KEY = "mean"  # mean of type_uar, two_ccc, high_ccc, culture_ccc (the paper's model selection)
# Fields every jointly trained run must share: they shape the stacked module, the batches or the schedule.
SHARED_FIELDS: tuple[str, ...] = (
    "arch", "head", "epochs", "batch_size", "weight_decay", "patience", "lr_factor", "grad_clip",
)


class TrainingError(ValueError):
    """Bad configs or data for a training run, or a run that diverged (non-finite loss)."""


@dataclass
class TrainConfig:
    """One run: architecture, loss weighting and seed, plus the optimisation settings of the paper.

    `arch` is the one source of the architecture: `head.arch` is overwritten with it.
    """

    arch: str = "vanilla"
    weighting: str = "uniform"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3             # the paper's head learning rate
    weight_decay: float = 0.01   # AdamW's default; never applied to loss-weighting parameters
    patience: int = 5            # epochs without validation improvement before the LR is halved
    lr_factor: float = 0.5
    grad_clip: float = 5.0       # per-run max gradient norm (0 or less: no clipping)
    head: HeadConfig = field(default_factory=HeadConfig)
    weighting_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):
            head = dict(self.head)
            if "chain_order" in head:
                head["chain_order"] = tuple(head["chain_order"])
            self.head = HeadConfig(**head)
        self.arch = self.arch.lower()
        self.weighting = self.weighting.lower()
        if self.head.arch != self.arch:
            self.head = dataclasses.replace(self.head, arch=self.arch)
        if self.epochs < 1:
            raise TrainingError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise TrainingError(f"batch_size must be >= 2 (CCC needs two rows), got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"lr must be a positive number, got {self.lr}")

    @property
    def name(self) -> str:
        """The run's directory name in an ablation grid."""
        return run_name(self.arch, self.weighting, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), so a stored config compares equal to a fresh one."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**data)


def run_name(arch: str, weighting: str, seed: int) -> str:
    return f"{arch}-{weighting}-s{seed}"


# ----------------------------------------------------------------------------------------------- checks

def _check_configs(configs: Sequence[TrainConfig], out_dirs: Sequence[Path]) -> None:
    if not configs:
        raise TrainingError("no run configs given")
    if len(configs) != len(out_dirs):
        raise TrainingError(f"{len(configs)} configs but {len(out_dirs)} output folders")
    if len({Path(d).resolve() for d in out_dirs}) != len(out_dirs):
        raise TrainingError("two runs share one output folder")
    first = configs[0]
    for cfg in configs[1:]:
        for name in SHARED_FIELDS:
            a, b = getattr(first, name), getattr(cfg, name)
            if a != b:
                raise TrainingError(
                    f"runs trained jointly must share {name}: {first.name} has {a!r}, {cfg.name} has {b!r}")


def _check_features(cache: CacheData, layers: Sequence[str], rows: np.ndarray) -> None:
    """Fail before training on NaN/inf features: they would only surface later as a NaN loss."""
    for layer in layers:
        if layer not in cache.pooled:
            raise TrainingError(
                f"cache has no pooled layer {layer!r} loaded (loaded: {', '.join(cache.pooled) or 'none'})")
        data = cache.pooled[layer]
        # In blocks and in the stored dtype: a float32 copy of a whole HUME-VB layer would be 180 MB.
        bad = np.concatenate([~np.isfinite(data[rows[i:i + FEATURE_CHECK_ROWS]]).all(axis=1)
                              for i in range(0, len(rows), FEATURE_CHECK_ROWS)] or [np.zeros(0, bool)])
        if bad.any():
            first = rows[np.flatnonzero(bad)[0]]
            file_row = int(cache.rows[first]) if getattr(cache, "rows", None) is not None else int(first)
            raise TrainingError(
                f"{where(cache.path, file_row, str(cache.ids[first]), f'layer {layer!r}')}: non-finite features "
                f"({cache.splits[first]!s} clip; {int(bad.sum())} clip(s) in all)")


# ------------------------------------------------------------------------------------------- batching

class _Features:
    """Cached inputs as torch tensors (kept in the cache's dtype; batches become float32 on slicing)."""

    def __init__(self, cache: CacheData, layers: Sequence[str], frames: Any = None,
                 frame_layers: Sequence[str] = (), n_runs: int = 1) -> None:
        self.pooled = {layer: torch.from_numpy(np.ascontiguousarray(cache.pooled[layer])) for layer in layers}
        self.frames = frames
        self.frame_layers = list(frame_layers)
        file_rows = getattr(cache, "rows", None)  # FrameReader indexes file rows, not loaded rows
        self.file_rows = np.arange(len(cache.ids)) if file_rows is None else np.asarray(file_rows, np.int64)
        if self.frame_layers:
            if frames is None:
                raise TrainingError(
                    f"this head attends over frames of {', '.join(self.frame_layers)}; pass a frame reader "
                    "(a cache dumped with frame-level layers)")
            missing = [layer for layer in self.frame_layers if layer not in frames.layers]
            if missing:
                raise TrainingError(f"the frame reader has no frames for {', '.join(missing)} "
                                    f"(it has {', '.join(frames.layers)})")
        budget = EVAL_RUN_ROWS if not self.frame_layers else EVAL_RUN_ROWS_FRAMES
        self.eval_batch = max(8, budget // max(1, int(n_runs)))

    def batch(self, rows: np.ndarray) -> HeadInputs:
        """Inputs for run-specific rows [R, B] -> HeadInputs with [R, B, ...] tensors."""
        r, b = rows.shape
        flat = torch.from_numpy(rows.reshape(-1))
        pooled = {k: v[flat].float().reshape(r, b, -1) for k, v in self.pooled.items()}
        frames, mask = self._frames(rows.reshape(-1))
        if frames is not None:
            frames = {k: v.reshape(r, b, *v.shape[1:]) for k, v in frames.items()}
            mask = mask.reshape(r, b, -1)
        return HeadInputs(pooled=pooled, frames=frames, frame_mask=mask)

    def shared(self, rows: np.ndarray, n_runs: int) -> HeadInputs:
        """Inputs for rows shared by all runs: [B] -> views expanded to [R, B, ...] (no copy)."""
        idx = torch.from_numpy(rows)
        pooled = {k: v[idx].float().unsqueeze(0).expand(n_runs, -1, -1) for k, v in self.pooled.items()}
        frames, mask = self._frames(rows)
        if frames is not None:
            frames = {k: v.unsqueeze(0).expand(n_runs, *v.shape) for k, v in frames.items()}
            mask = mask.unsqueeze(0).expand(n_runs, *mask.shape)
        return HeadInputs(pooled=pooled, frames=frames, frame_mask=mask)

    def _frames(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """Frames of `rows` zero-padded to the longest clip of the batch, with the valid-frame mask.

        Each distinct clip is read once: runs with the same seed share their shuffle, so a joint batch of
        4 weightings x 3 seeds holds each clip 4 times.
        """
        if not self.frame_layers:
            return None, None
        uniq, inverse = np.unique(rows, return_inverse=True)
        if len(uniq) < len(rows):
            frames, mask = self._frames(uniq)
            index = torch.from_numpy(inverse.reshape(-1))
            return {k: v[index] for k, v in frames.items()}, mask[index]
        data = self.frames.get(self.file_rows[rows])
        lengths = np.array([len(x) for x in data[self.frame_layers[0]]], dtype=np.int64)
        t_max = max(1, int(lengths.max()) if len(lengths) else 1)
        out = {}
        for layer in self.frame_layers:
            clips = data[layer]
            arr = np.zeros((len(rows), t_max, clips[0].shape[-1] if clips else 0), dtype=np.float32)
            for i, clip in enumerate(clips):
                arr[i, :len(clip)] = clip
            out[layer] = torch.from_numpy(arr)
        mask = torch.from_numpy(np.arange(t_max)[None, :] < lengths[:, None])
        return out, mask


def _targets(labels: dict[str, torch.Tensor], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Label tensors for run-specific rows [R, B] -> task -> [R, B, label_dim] (TYPE: class index as float)."""
    r, b = rows.shape
    flat = torch.from_numpy(rows.reshape(-1))
    return {name: labels[name][flat].reshape(r, b, -1) for name in TASK_NAMES}


def _epoch_batches(seeds: Sequence[int], epoch: int, train_rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Per-run shuffles of the Train rows cut into batches: a list of [R, B] row indices into the cache.

    A last partial batch is kept when it has at least 2 rows (CCC needs two) and dropped otherwise.
    """
    perms = np.stack([train_rows[np.random.default_rng((int(s), epoch)).permutation(len(train_rows))]
                      for s in seeds])
    n_full, rest = divmod(len(train_rows), batch_size)
    batches = [perms[:, i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
    if rest >= 2:
        batches.append(perms[:, n_full * batch_size:])
    return batches


# ------------------------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def _predict(model: MultiTaskHead, feats: _Features, rows: np.ndarray, n_runs: int) -> dict[str, np.ndarray]:
    """Eval-mode predictions of every run on `rows`: task -> [R, N, k] float32 (TYPE: class probabilities)."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in TASK_NAMES}
    for start in range(0, len(rows), feats.eval_batch):
        out = model(feats.shared(rows[start:start + feats.eval_batch], n_runs))
        for name in TASK_NAMES:
            value = out[name].float()
            chunks[name].append(torch.softmax(value, -1) if TASKS[name].is_classification else value)
    model.train(was_training)
    if len(rows) == 0:
        return {name: np.zeros((n_runs, 0, TASKS[name].out_dim), np.float32) for name in TASK_NAMES}
    return {name: torch.cat(parts, 1).numpy() for name, parts in chunks.items()}


def _run_preds(preds: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    return {name: value[r] for name, value in preds.items()}


def _score_runs(labels: dict[str, np.ndarray], preds: dict[str, np.ndarray], n_runs: int,
                names: Sequence[str], when: str) -> list[dict[str, float]]:
    scores = []
    for r in range(n_runs):
        run_preds = _run_preds(preds, r)
        for task, value in run_preds.items():
            if not np.isfinite(value).all():
                raise TrainingError(f"run {names[r]}, {when}: non-finite {task} predictions on Val")
        scores.append(score_all(labels, run_preds))
    return scores


# ---------------------------------------------------------------------------------------------- output

def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_config_record(cfg: TrainConfig, cache: CacheData, cache_path: str | Path | None) -> dict[str, Any]:
    """What config.json holds: the TrainConfig's fields at top level (so readers find `arch`, `weighting`,
    `seed` directly), the cache path and the cache facts that decide whether features are interchangeable.
    An ablation compares it to decide whether a finished run can be reused."""
    attrs = getattr(cache, "attrs", {}) or {}
    path = cache_path if cache_path is not None else getattr(cache, "path", None)
    return {
        "run_format": RUN_FORMAT,
        **cfg.to_dict(),
        "cache": str(Path(path).resolve()) if path is not None else None,
        "cache_attrs": _jsonable(compat_attrs(attrs)),
    }


def _save_head(path: Path, state: dict[str, torch.Tensor], cfg: TrainConfig) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"train_config": json.dumps(cfg.to_dict())})


def _write_predictions(folder: Path, ids: Sequence[str], preds: dict[str, np.ndarray]) -> None:
    write_submissions(folder, ids, preds, team="avb", number=1)
    write_type_probs(folder / PROBS_FILE, ids, preds["type"])


# --------------------------------------------------------------------------------------------- training

def _build_weightings(configs: Sequence[TrainConfig]) -> list[tuple[list[int], Any]]:
    """One weighting module per (kind, options): [(run indices, module)]."""
    groups: dict[str, list[int]] = {}
    for r, cfg in enumerate(configs):
        key = json.dumps([cfg.weighting, cfg.weighting_options], sort_keys=True)
        groups.setdefault(key, []).append(r)
    out = []
    for key, runs in groups.items():
        kind, options = json.loads(key)
        try:
            module = build_weighting(kind, len(runs), len(TASK_NAMES), **options)
        except ValueError as err:
            raise TrainingError(f"run {configs[runs[0]].name}: {err}") from None
        out.append((runs, module))
    return out


def _check_loss(losses: torch.Tensor, totals: torch.Tensor, configs: Sequence[TrainConfig], epoch: int) -> None:
    bad = ~torch.isfinite(losses)
    if bad.any():
        r, k = (int(i) for i in torch.nonzero(bad)[0])
        raise TrainingError(
            f"run {configs[r].name}, epoch {epoch}: {TASK_NAMES[k]} loss is {float(losses[r, k])}; training stopped "
            "(check the features and labels, or lower the learning rate)")
    bad_total = ~torch.isfinite(totals)
    if bad_total.any():
        r = int(torch.nonzero(bad_total)[0])
        raise TrainingError(
            f"run {configs[r].name}, epoch {epoch}: weighted total loss is {float(totals[r])} (loss weighting "
            f"{configs[r].weighting!r} diverged); training stopped")


def train_runs(
    cache: CacheData,
    configs: list[TrainConfig],
    out_dirs: list[Path],
    *,
    progress: bool = True,
    frames: Any = None,
    cache_path: str | Path | None = None,
) -> list[dict]:
    """Train `configs` jointly on `cache` and write one run folder each; returns each run's metrics dict.

    All configs must share the fields in SHARED_FIELDS (they define the stacked module and the batches);
    weighting, seed and lr may differ. `frames` is a frame reader (`cache.reader.FrameReader`) for a BRANCH
    head that attends over frames. `cache_path` is recorded in config.json (default: `cache.path`).
    """
    out_dirs = [Path(d) for d in out_dirs]
    _check_configs(configs, out_dirs)
    n_runs = len(configs)
    names = [c.name for c in configs]
    first = configs[0]
    seeds = [c.seed for c in configs]

    train_rows = np.asarray(cache.indices("Train"), dtype=np.int64)
    val_rows = np.asarray(cache.indices("Val"), dtype=np.int64)
    test_rows = np.asarray(cache.indices("Test"), dtype=np.int64)
    if len(train_rows) < 2:
        raise TrainingError(f"cache has {len(train_rows)} Train clip(s); training needs at least 2")
    if len(val_rows) == 0:
        raise TrainingError("cache has no Val clips; model selection needs the Val split")

    model = MultiTaskHead(first.head, dict(cache.layer_dims), seeds)
    layers = list(model.required_layers)
    _check_features(cache, layers, np.concatenate([train_rows, val_rows, test_rows]))
    feats = _Features(cache, layers, frames, list(getattr(model, "required_frame_layers", [])), n_runs)
    labels_t = {name: torch.as_tensor(np.asarray(cache.labels[name], dtype=np.float32)) for name in TASK_NAMES}
    val_labels = {name: np.asarray(cache.labels[name], dtype=np.float64)[val_rows] for name in TASK_NAMES}

    weightings = _build_weightings(configs)
    group_index = [torch.as_tensor(runs, dtype=torch.long) for runs, _ in weightings]
    param_groups: list[dict] = [{"params": list(model.parameters()), "weight_decay": first.weight_decay}]
    for runs, module in weightings:
        params = [p for p in module.parameters() if p.requires_grad]
        if params:  # loss weights are not network weights: no decay (it would drag every alpha to a bound)
            param_groups.append({"params": params, "runs": runs, "weight_decay": 0.0})
    optimizer = StackedAdamW(param_groups, n_runs, lr=[c.lr for c in configs],
                             max_grad_norm=first.grad_clip if first.grad_clip > 0 else None)
    scheduler = PlateauHalving(optimizer, patience=first.patience, factor=first.lr_factor)

    # A rerun into the same folder must never leave an old metrics.json next to new files.
    for cfg, out in zip(configs, out_dirs):
        (out / METRICS_FILE).unlink(missing_ok=True)
        write_json_atomic(out / CONFIG_FILE, run_config_record(cfg, cache, cache_path))

    history: list[list[dict]] = [[] for _ in range(n_runs)]
    best_mean = np.full(n_runs, -np.inf)
    best_epoch = np.zeros(n_runs, dtype=np.int64)
    best_state: list[dict[str, torch.Tensor] | None] = [None] * n_runs

    optimizer.zero_grad()
    bar = tqdm(range(1, first.epochs + 1), desc=f"{first.arch} x{n_runs}", unit="epoch",
               disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        for _, module in weightings:
            module.train()
        lr_used = optimizer.lr.clone()
        sum_losses = torch.zeros(n_runs, len(TASK_NAMES), dtype=torch.float64)
        sum_totals = torch.zeros(n_runs, dtype=torch.float64)
        batches = _epoch_batches(seeds, epoch, train_rows, first.batch_size)
        for rows in batches:
            targets = _targets(labels_t, rows)
            outputs = model(feats.batch(rows), targets)
            losses = task_losses(outputs, targets)                    # [R, K]
            totals = torch.zeros(n_runs, dtype=losses.dtype)
            for index, (_, module) in zip(group_index, weightings):
                totals = totals.index_put((index,), module(losses[index]))
            _check_loss(losses.detach(), totals.detach(), configs, epoch)
            totals.sum().backward()  # runs share no parameter, so each gets exactly its own gradient
            optimizer.step()
            optimizer.zero_grad()    # frees the gradients now: evaluation and best-state copies reuse that memory
            sum_losses += losses.detach().double()
            sum_totals += totals.detach().double()
        epoch_losses = (sum_losses / len(batches)).float()
        weights = torch.zeros(n_runs, len(TASK_NAMES))
        for runs, module in weightings:
            weights[runs] = module.weights().detach().float()  # the weights in force during this epoch
            module.end_epoch(epoch_losses[runs])

        val_preds = _predict(model, feats, val_rows, n_runs)
        scores = _score_runs(val_labels, val_preds, n_runs, names, f"epoch {epoch}")
        means = np.array([s[SELECTION_KEY] for s in scores])
        for r in range(n_runs):
            history[r].append({
                "epoch": epoch,
                "loss": float(sum_totals[r] / len(batches)),
                "task_losses": {t: float(epoch_losses[r, k]) for k, t in enumerate(TASK_NAMES)},
                "weights": {t: float(weights[r, k]) for k, t in enumerate(TASK_NAMES)},
                "lr": float(lr_used[r]),
                "val": {k: float(scores[r][k]) for k in (*METRIC_KEYS, SELECTION_KEY)},
            })
            if means[r] > best_mean[r]:  # ties keep the earlier epoch
                best_mean[r], best_epoch[r] = means[r], epoch
                best_state[r] = {k: v.detach().clone() for k, v in model.run_state_dict(r).items()}
        scheduler.step(means)
        bar.set_postfix(best_mean=f"{best_mean.max():.4f}")
    bar.close()

    # Reload every run's best epoch (real copies) and predict Val and Test with it.
    for r in range(n_runs):
        model.load_run_state_dict(r, best_state[r])
    final_val = _predict(model, feats, val_rows, n_runs)
    final_test = _predict(model, feats, test_rows, n_runs)
    final_scores = _score_runs(val_labels, final_val, n_runs, names, "best epoch")
    val_ids = [str(i) for i in cache.ids[val_rows]]
    test_ids = [str(i) for i in cache.ids[test_rows]]

    results = []
    for r, (cfg, out) in enumerate(zip(configs, out_dirs)):
        _save_head(out / HEAD_FILE, best_state[r], cfg)
        _write_predictions(out / "predictions" / "val", val_ids, _run_preds(final_val, r))
        if len(test_ids):
            test_preds = _run_preds(final_test, r)
            for task, value in test_preds.items():
                if not np.isfinite(value).all():
                    raise TrainingError(f"run {cfg.name}: non-finite {task} predictions on Test")
            _write_predictions(out / "predictions" / "test", test_ids, test_preds)
        metrics: dict[str, Any] = {k: float(final_scores[r][k]) for k in METRIC_KEYS}
        metrics[SELECTION_KEY] = float(final_scores[r][SELECTION_KEY])
        metrics["best_epoch"] = int(best_epoch[r])
        metrics["run"] = cfg.name
        metrics["history"] = history[r]
        write_json_atomic(out / METRICS_FILE, metrics)  # last: its presence marks the run complete
        results.append(metrics)
    return results

