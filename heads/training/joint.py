"""Train R head runs jointly from a feature cache: one stacked head, one optimiser step for all.

Why jointly: a run on cached features at batch size 8 is dominated by per-operation overhead, not arithmetic,
so R runs of one architecture cost little more than one when their parameters are stacked along a leading run
dim and every step is one batched forward/backward. Joint training must not change any run, so everything
that is random or adaptive is per run: the initial parameters (the head seeds each run's slice), the shuffle
(`np.random.default_rng((seed, epoch))`), the dropout generator, the learning rate and its plateau schedule,
the gradient-norm clipping (`heads.model.optim`) and the loss weighting (one module per weighting kind, covering
the runs of that kind). The runs' losses are summed before `backward`, which gives each run exactly its own
gradient because no parameter is shared. A run trained alone therefore equals the same run trained jointly.

Everything a step touches lives on the training device (`--device`): features, labels, each epoch's
shuffles, parameters, optimiser state and dropout generators, so a step makes no host round trip. On the CPU
a non-finite loss stops training at the step it appears; on an accelerator it is found from the epoch's
loss sums (a check per step would stall the device), with the same message.

Selection follows the paper: the validation `mean` of the four headline scores picks the best epoch. The best
epoch's parameters are COPIED (the reference code kept a reference to the live state dict, so its "best"
predictions were the last epoch's) and reloaded at the end; the saved predictions and metrics come from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cache.command_kit.atomic import atomic_path, write_json_atomic
from cache.command_kit.jsonable import jsonable
from cache.reader import compat_attrs
from heads.metrics import score_all
from heads.model.architectures import (
    HeadConfig,
    MultiTaskHead,
    build_head,
)
from heads.model.layers import keep_runs_
from heads.model.losses import task_losses
from heads.model.optim import PlateauHalving, StackedAdamW
from heads.model.weighting import WeightingError, build_weighting
from heads.names import DEFAULT_EPOCHS
from heads.runs import (
    CONFIG_FILE,
    HEAD_FILE,
    METRICS_FILE,
    RUN_FORMAT,
    history_entry,
    predictions_dir,
)
from heads.submission import write_predictions
from heads.tasks import SELECTION_KEY, TaskSet, tasks_of
from heads.training.device import (
    DeviceError,
    autocast,
    check_precision,
    describe,
)
from heads.training.folds import CV_ROUND
from heads.training.inputs import (
    Features,
    Labels,
    TrainingError,
    check_features,
    device_batches,
    epoch_batches,
)

if TYPE_CHECKING:
    from cache.reader import CacheData

# Fields every jointly trained run must share: they shape the stacked module, the batches or the schedule.
# Per run, besides arch-weighting-seed: lr, weighting_options and the head's dropout probability.
SHARED_FIELDS: tuple[str, ...] = (
    "arch", "head", "epochs", "batch_size", "weight_decay", "patience", "lr_factor", "grad_clip", "precision",
)


def shape_key(cfg: TrainConfig) -> tuple[Any, ...]:
    """What runs trained jointly must have in common (SHARED_FIELDS, the head's dropout left out)."""
    return tuple(json.dumps(jsonable(getattr(cfg, name) if name != "head" else
                                     dataclasses.replace(cfg.head, dropout=0.0)), sort_keys=True)
                 for name in SHARED_FIELDS)


@dataclass
class TrainConfig:
    """One run: architecture, loss weighting and seed, plus the optimisation settings of the paper.

    `arch` is the one source of the architecture: `head.arch` is overwritten with it.
    """

    arch: str = "vanilla"
    weighting: str = "uniform"
    seed: int = 0
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 8
    lr: float = 1e-3             # the paper's head learning rate
    weight_decay: float = 0.01   # AdamW's default; never applied to loss-weighting parameters
    patience: int = 5            # epochs without validation improvement before the LR is halved
    lr_factor: float = 0.5
    grad_clip: float = 5.0       # per-run max gradient norm (0 or less: no clipping)
    precision: str = "fp32"      # "bf16": the heads' matmuls under bf16 autocast (a GPU option)
    head: HeadConfig = field(default_factory=HeadConfig)
    weighting_options: dict = field(default_factory=dict)
    variant: str = ""            # a grid's varied fields, `-<field>=<value>...` (heads.training.axes): name suffix

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
        try:
            check_precision(self.precision)
        except DeviceError as err:
            raise TrainingError(str(err)) from None

    @property
    def name(self) -> str:
        """The run's directory name in an ablation grid."""
        return run_name(self.arch, self.weighting, self.seed) + self.variant

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), so a stored config compares equal to a fresh one; no
        `variant` outside a varied grid (the record of every run from before axes existed)."""
        data = jsonable(dataclasses.asdict(self))
        if not self.variant:
            data.pop("variant")
        return data

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
    first, key = configs[0], shape_key(configs[0])
    for cfg in configs[1:]:
        for name, a, b in zip(SHARED_FIELDS, key, shape_key(cfg)):
            if a != b:
                raise TrainingError(
                    f"runs trained jointly must share {name}: {first.name} has {a}, {cfg.name} has {b}")


# ------------------------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def _predict(model: MultiTaskHead, feats: Features, rows: np.ndarray, n_runs: int,
             precision: str = "fp32") -> dict[str, np.ndarray]:
    """Eval-mode predictions of every run on `rows`: task -> [R, N, k] float32 (classification: probabilities)."""
    was_training = model.training
    model.eval()
    names = model.tasks.names
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    chunk = max(8, feats.eval_batch // model.eval_row_cost)
    for start in range(0, len(rows), chunk):
        with autocast(feats.device, precision):
            out = model.predict(feats.shared(rows[start:start + chunk]))
        for name in names:
            chunks[name].append(out[name])
    model.train(was_training)
    if len(rows) == 0:
        return {task.name: np.zeros((n_runs, 0, task.out_dim), np.float32) for task in model.tasks}
    return {name: torch.cat(parts, 1).cpu().numpy() for name, parts in chunks.items()}


def _run_preds(preds: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    return {name: value[r] for name, value in preds.items()}


def _score_runs(tasks: TaskSet, labels: dict[str, np.ndarray], preds: dict[str, np.ndarray], n_runs: int,
                names: Sequence[str], when: str) -> list[dict[str, float]]:
    scores = []
    for r in range(n_runs):
        run_preds = _run_preds(preds, r)
        for task, value in run_preds.items():
            if not np.isfinite(value).all():
                raise TrainingError(f"run {names[r]}, {when}: non-finite {task} predictions on Val")
        scores.append(score_all(tasks, labels, run_preds))
    return scores


# ---------------------------------------------------------------------------------------------- output

def run_config_record(cfg: TrainConfig, cache: CacheData) -> dict[str, Any]:
    """What config.json holds: the TrainConfig's fields at top level (so readers find `arch`, `weighting`,
    `seed` directly), the cache's path and the cache facts that decide whether features are interchangeable.
    An ablation compares it to decide whether a finished run can be reused."""
    return {
        "run_format": RUN_FORMAT,
        **cfg.to_dict(),
        "cache": str(Path(cache.path).resolve()),
        "cache_attrs": jsonable(compat_attrs(cache.attrs or {})),
        **({CV_ROUND: cache.attrs[CV_ROUND]} if CV_ROUND in (cache.attrs or {}) else {}),
    }


def _save_head(path: Path, state: dict[str, torch.Tensor], cfg: TrainConfig) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"train_config": json.dumps(cfg.to_dict())})


def _write_predictions(folder: Path, tasks: TaskSet, ids: Sequence[str], preds: dict[str, np.ndarray]) -> None:
    write_predictions(folder, tasks, ids, preds)


# --------------------------------------------------------------------------------------------- training

def _build_weightings(configs: Sequence[TrainConfig], n_tasks: int) -> list[tuple[list[int], Any]]:
    """One weighting module per (kind, options): [(run indices, module)]."""
    groups: dict[str, list[int]] = {}
    for r, cfg in enumerate(configs):
        key = json.dumps([cfg.weighting, cfg.weighting_options], sort_keys=True)
        groups.setdefault(key, []).append(r)
    out = []
    for key, runs in groups.items():
        kind, options = json.loads(key)
        try:
            module = build_weighting(kind, len(runs), n_tasks, **options)
            module.set_run_seeds([configs[r].seed for r in runs])
        except WeightingError as err:
            raise TrainingError(f"run {configs[runs[0]].name}: {err}") from None
        out.append((runs, module))
    return out


def _check_loss(losses: torch.Tensor, totals: torch.Tensor, configs: Sequence[TrainConfig], epoch: int,
                names: Sequence[str]) -> None:
    """Stop on the first non-finite task loss or weighted total (per run, [R, K] and [R]), naming run and task."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        r, k = (int(i) for i in torch.nonzero(bad)[0])
        raise TrainingError(
            f"run {configs[r].name}, epoch {epoch}: {names[k]} loss is {float(losses[r, k])}; training stopped "
            "(check the features and labels, or lower the learning rate)")
    bad_total = ~torch.isfinite(totals)
    if bad_total.any():
        r = int(torch.nonzero(bad_total)[0])
        raise TrainingError(
            f"run {configs[r].name}, epoch {epoch}: weighted total loss is {float(totals[r])} (loss weighting "
            f"{configs[r].weighting!r} diverged); training stopped")


def check_no_leak(cache: CacheData, rows: np.ndarray) -> None:
    """Refuse to select or score a head on a clip the backbone was fine-tuned on (the cache's
    clip_info/backbone_trained, written by a dump from an `avb finetune` export): its features have seen the
    clip's labels, so the score would be inflated. Cross-validation runs the round whose backbone it is."""
    trained = cache.clip_info.get("backbone_trained")
    if trained is None or len(rows) == 0:
        return
    seen = np.asarray(rows)[np.asarray(trained)[rows] > 0]
    if len(seen):
        first = int(seen[0])
        raise TrainingError(
            f"{cache.path}: clip {cache.ids[first]} is in the {cache.splits[first]} split here, but the backbone "
            f"was fine-tuned on it ({len(seen)} such clips); a head scored there would leak. Use the splits (or "
            "--folds K --fold k) the backbone was fine-tuned for")


class JointTraining:
    """The state of one joint `train_runs` call, in the order a reader meets it: setup (`__init__`), one epoch
    of steps (`train_epoch`), validation and best-epoch selection (`validate`), the run folders (`finish`)."""

    def __init__(self, cache: CacheData, configs: list[TrainConfig], out_dirs: list[Path], *, frames: Any,
                 device: torch.device, provenance: dict | None = None) -> None:
        _check_configs(configs, out_dirs)
        self.provenance = dict(provenance or {})
        self.cache, self.configs, self.out_dirs = cache, configs, out_dirs
        self.device, self.first = device, configs[0]
        self.n_runs, self.names, self.seeds = len(configs), [c.name for c in configs], [c.seed for c in configs]
        self.train_rows, self.val_rows, self.test_rows = (
            np.asarray(cache.indices(split), dtype=np.int64) for split in ("Train", "Val", "Test"))
        if len(self.train_rows) < 2:
            raise TrainingError(f"cache has {len(self.train_rows)} Train clip(s); training needs at least 2")
        check_no_leak(cache, np.concatenate([self.val_rows, self.test_rows]))
        if len(self.val_rows) == 0:
            raise TrainingError("cache has no Val clips; model selection needs the Val split")

        self.tasks = tasks_of(cache.attrs, str(cache.path))
        self.model = build_head(self.first.head, dict(cache.layer_dims), self.seeds, self.tasks, device=device,
                                draw_ahead=True)
        self.model.set_run_dropout([c.head.dropout for c in configs])
        check_features(cache, self.model.required_layers,
                       np.concatenate([self.train_rows, self.val_rows, self.test_rows]))
        self.model.use_grad_buffers()
        self.feats = Features(cache, self.model.required_layers, frames, self.model.required_frame_layers, self.n_runs,
                               device)
        self.labels = Labels(cache, self.tasks, device)
        self.val_labels = {name: np.asarray(cache.labels[name], dtype=np.float64)[self.val_rows]
                           for name in self.tasks.names}

        self.weightings = [(runs, module.to(device)) for runs, module in _build_weightings(configs, len(self.tasks))]
        self.weighting_index = [torch.as_tensor(runs, dtype=torch.long, device=device) for runs, _ in self.weightings]
        self.measured = self._measured()
        groups: list[dict] = [{"params": list(self.model.parameters()), "weight_decay": self.first.weight_decay}]
        for runs, module in self.weightings:
            params = [p for p in module.parameters() if p.requires_grad]
            if params:  # loss weights are not network weights: no decay (it would drag every alpha to a bound)
                groups.append({"params": params, "runs": runs, "weight_decay": 0.0})
        self.optimizer = StackedAdamW(groups, self.n_runs, lr=[c.lr for c in configs],
                                      max_grad_norm=self.first.grad_clip if self.first.grad_clip > 0 else None)
        self.scheduler = PlateauHalving(self.optimizer, patience=self.first.patience, factor=self.first.lr_factor)
        self.check_each_step = device.type == "cpu"

        self.history: list[list[dict]] = [[] for _ in range(self.n_runs)]
        self.steps = 0   # optimiser steps taken so far; every run steps on each of them
        self.best_mean = np.full(self.n_runs, -np.inf)
        self.best_epoch = np.zeros(self.n_runs, dtype=np.int64)
        self.best_state: list[dict[str, torch.Tensor] | None] = [None] * self.n_runs

    def _measured(self) -> list[tuple[torch.Tensor, Any]]:
        """(run index, module) of the weightings that see each step's batch again after the step (FAMO)."""
        return [(index, module) for index, (_, module) in zip(self.weighting_index, self.weightings)
                if module.measures_steps]

    def write_configs(self) -> None:
        """config.json of every run; a rerun into the same folder must never leave an old metrics.json behind."""
        for cfg, out in zip(self.configs, self.out_dirs):
            (out / METRICS_FILE).unlink(missing_ok=True)
            write_json_atomic(out / CONFIG_FILE, run_config_record(cfg, self.cache))

    def _step(self, rows: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step of every run on its batch rows [R, B]: (task losses [R, K], weighted totals [R])."""
        targets = self.labels.batch(rows)
        inputs = self.feats.batch(rows)
        with autocast(self.device, self.first.precision):
            outputs = self.model(inputs, targets)
            losses = task_losses(self.tasks, outputs, targets)                                   # [R, K]
        totals = torch.zeros(self.n_runs, dtype=losses.dtype, device=self.device)
        for index, (_, module) in zip(self.weighting_index, self.weightings):
            totals = totals.index_put((index,), module(losses[index]))
        if self.check_each_step:
            _check_loss(losses.detach(), totals.detach(), self.configs, epoch, self.tasks.names)
        totals.sum().backward()  # runs share no parameter, so each gets exactly its own gradient
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.measured:   # FAMO: the batch again, after the step (no gradient, no dropout drawn)
            with torch.no_grad(), self.model.without_dropout(), autocast(self.device, self.first.precision):
                after = task_losses(self.tasks, self.model(inputs, targets), targets)
            for index, module in self.measured:
                module.after_step(after[index])
        return losses.detach(), totals.detach()

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """Every run's pass over its own shuffle of Train; the epoch's mean losses and the weights in force."""
        self.model.train()
        for _, module in self.weightings:
            module.train()
        lr_used = self.optimizer.lr.clone()
        sum_losses = torch.zeros(self.n_runs, len(self.tasks), dtype=torch.float64, device=self.device)
        sum_totals = torch.zeros(self.n_runs, dtype=torch.float64, device=self.device)
        batches = device_batches(epoch_batches(self.seeds, epoch, self.train_rows, self.first.batch_size),
                                  self.device)
        for rows in batches:
            losses, totals = self._step(rows, epoch)
            self.steps += 1
            sum_losses += losses.double()
            sum_totals += totals.double()
        if not self.check_each_step:   # a non-finite step poisons the epoch's sums
            _check_loss(sum_losses, sum_totals, self.configs, epoch, self.tasks.names)
        epoch_losses = (sum_losses / len(batches)).float()
        weights = torch.zeros(self.n_runs, len(self.tasks))
        for runs, module in self.weightings:
            weights[runs] = module.weights().detach().float().cpu()  # the weights in force during this epoch
            module.end_epoch(epoch_losses[runs])
        return {"losses": epoch_losses.cpu(), "totals": (sum_totals / len(batches)).cpu(), "weights": weights,
                "lr": lr_used}

    def validate(self, epoch: int, stats: dict[str, torch.Tensor]) -> None:
        """Score every run on Val, record the epoch, keep a copy of each run's best epoch, step the schedule."""
        val_preds = _predict(self.model, self.feats, self.val_rows, self.n_runs, self.first.precision)
        scores = _score_runs(self.tasks, self.val_labels, val_preds, self.n_runs, self.names, f"epoch {epoch}")
        means = np.array([s[SELECTION_KEY] for s in scores])
        for r in range(self.n_runs):
            self.history[r].append(history_entry(
                epoch=epoch, step=self.steps, loss=float(stats["totals"][r]),
                task_losses={t: float(stats["losses"][r, k]) for k, t in enumerate(self.tasks.names)},
                weights={t: float(stats["weights"][r, k]) for k, t in enumerate(self.tasks.names)},
                lr={"head": float(stats["lr"][r])},
                val={k: float(scores[r][k]) for k in (*self.tasks.metric_keys, SELECTION_KEY)},
            ))
            if means[r] > self.best_mean[r]:  # ties keep the earlier epoch
                self.best_mean[r], self.best_epoch[r] = means[r], epoch
                self.best_state[r] = self.model.run_state_dict(r)
        self.scheduler.step(means)

    def keep_runs(self, keep: Sequence[int]) -> None:
        """Go on with the runs `keep` only (a search drops its pruned trials): the model, each weighting, the
        optimiser, the schedule and every per-run record are cut to them, so a kept run trains on exactly as it
        would have, and the stack costs what the kept runs do. A dropped run's folder keeps only config.json."""
        keep = sorted(int(r) for r in keep)
        new_index = {r: i for i, r in enumerate(keep)}
        keep_runs_(self.model, keep)
        weightings = []
        for runs, module in self.weightings:
            rows = [i for i, r in enumerate(runs) if r in new_index]
            if rows:
                keep_runs_(module, rows)
                weightings.append(([new_index[runs[i]] for i in rows], module))
        self.optimizer.keep_runs(keep)
        self.scheduler.keep_runs(keep)
        self.weightings = weightings
        self.weighting_index = [torch.as_tensor(runs, dtype=torch.long, device=self.device) for runs, _ in weightings]
        self.measured = self._measured()
        self.configs, self.out_dirs, self.names, self.seeds, self.history, self.best_state = (
            [items[r] for r in keep] for items in
            (self.configs, self.out_dirs, self.names, self.seeds, self.history, self.best_state))
        self.best_mean, self.best_epoch = self.best_mean[keep], self.best_epoch[keep]
        self.n_runs, self.first = len(keep), self.configs[0]

    def finish(self) -> list[dict]:
        """Reload every run's best epoch (real copies), predict Val and Test with it, write each run folder."""
        for r in range(self.n_runs):
            self.model.load_run_state_dict(r, self.best_state[r])
        final_val = _predict(self.model, self.feats, self.val_rows, self.n_runs, self.first.precision)
        final_test = _predict(self.model, self.feats, self.test_rows, self.n_runs, self.first.precision)
        final_scores = _score_runs(self.tasks, self.val_labels, final_val, self.n_runs, self.names, "best epoch")
        val_ids = [str(i) for i in self.cache.ids[self.val_rows]]
        test_ids = [str(i) for i in self.cache.ids[self.test_rows]]
        results = []
        for r, (cfg, out) in enumerate(zip(self.configs, self.out_dirs)):
            _save_head(out / HEAD_FILE, self.best_state[r], cfg)
            _write_predictions(predictions_dir(out, "Val"), self.tasks, val_ids, _run_preds(final_val, r))
            if len(test_ids):
                test_preds = _run_preds(final_test, r)
                for task, value in test_preds.items():
                    if not np.isfinite(value).all():
                        raise TrainingError(f"run {cfg.name}: non-finite {task} predictions on Test")
                _write_predictions(predictions_dir(out, "Test"), self.tasks, test_ids, test_preds)
            metrics: dict[str, Any] = {k: float(final_scores[r][k]) for k in self.tasks.metric_keys}
            metrics[SELECTION_KEY] = float(final_scores[r][SELECTION_KEY])
            metrics["best_epoch"] = int(self.best_epoch[r])
            metrics["run"] = cfg.name
            metrics["trained_on"] = {"device": describe(self.device), **self.provenance}
            metrics["history"] = self.history[r]
            write_json_atomic(out / METRICS_FILE, metrics)  # last: its presence marks the run complete
            results.append(metrics)
        return results


def train_runs(
    cache: CacheData,
    configs: list[TrainConfig],
    out_dirs: list[Path],
    *,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    frames: Any = None,
    provenance: dict | None = None,
    tracker: Callable[[str, int, dict], None] | None = None,
    drop: Callable[[int], Collection[str]] | None = None,
) -> list[dict | None]:
    """Train `configs` jointly on `cache` and write one run folder each; returns each run's metrics dict.

    All configs must share the fields in SHARED_FIELDS (they define the stacked module and the batches);
    weighting, seed and lr may differ. `device` is where training runs, as the command line resolved it
    (`heads.training.device.resolve_device`); metrics.json records it under "trained_on", with `provenance`
    (e.g. the grid process that trained it). `frames` is a frame reader (`cache.reader.FrameReader`) for a
    BRANCH head that attends over frames. `tracker` (e.g. `heads.training.tracking.HeadsTracker`) is called
    once per run and epoch with (run name, epoch, that epoch's history entry); `drop(epoch)`, asked after each
    epoch, names the runs that stop there (a search's pruned trials): they leave the stack (JointTraining.
    keep_runs), are not written, and are None in the returned list.
    """
    out_dirs = [Path(d) for d in out_dirs]
    job = JointTraining(cache, configs, out_dirs, frames=frames, device=torch.device(device), provenance=provenance)
    job.write_configs()
    alive = list(range(len(configs)))   # the position in `configs` of each run still in the stack
    bar = tqdm(range(1, job.first.epochs + 1), desc=f"{job.first.arch} x{job.n_runs}", unit="epoch",
               disable=not progress, leave=False)
    for epoch in bar:
        job.validate(epoch, job.train_epoch(epoch))
        if tracker is not None:
            for r, name in enumerate(job.names):
                tracker(name, epoch, job.history[r][-1])
        bar.set_postfix(best_mean=f"{job.best_mean.max():.4f}")
        stopping = set(drop(epoch)) if drop is not None else set()
        if stopping & set(job.names):
            kept = [r for r, name in enumerate(job.names) if name not in stopping]
            alive = [alive[r] for r in kept]
            if not kept:
                break
            job.keep_runs(kept)
    bar.close()
    results: list[dict | None] = [None] * len(configs)
    for i, metrics in zip(alive, job.finish() if alive else []):
        results[i] = metrics
    return results
