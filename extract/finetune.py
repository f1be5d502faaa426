"""Stage 1 fine-tuning: wav2vec2 + a multi-task head from `heads`, end to end, under accelerate.

    accelerate launch -m extract.finetune --corpus ROOT --model facebook/wav2vec2-base --out DIR
    avb finetune ...   (the same, in one process)

The paper's recipe (Sec. III-B): random 2.5 s crops, SpecAugment (time and feature masking, p = 0.05), AdamW
with 1e-5 on the backbone and 1e-3 on the head, batch 8, 30 epochs, learning rate halved when the validation
score (mean of the four task scores) has not improved for 5 epochs, model selection on validation.

How it is laid out and why:
* Backbone, head and loss weighting are one module (`FinetuneModel`) that also computes the loss, so DDP
  all-reduces every trainable parameter, including RRUW/DRUW's uncertainty alpha (trained at the head LR,
  without weight decay, as heads.model.weighting asks). LayerDrop is off (see `extract.backbone.load_backbone`),
  so every trainable parameter is used in every step.
* The global gradient norm is clipped (`--grad-clip`, 5 as in the heads) and a non-finite one stops the run
  before the update, with the epoch and step in the error: a NaN loss never reaches the saved weights.
* `--batch-size` is per process (and per micro-batch): the effective batch is batch x processes x grad-accum.
  The CCC loss is computed on each process's micro-batch.
* Validation runs over the whole Val split; `gather_for_metrics` drops the samples accelerate repeats to
  even out the last batch, so the metrics are the same for any number of processes.
* Checkpoints (`accelerator.save_state`: model, optimizer, RNG states) go to OUT/checkpoints/step-XXXXXXXX
  at each epoch end and when --max-steps is reached, written under a temporary name and renamed, with
  `train_state.json` (epoch, step, position inside the epoch, history, plateau-scheduler state). --resume
  loads the newest one and skips the batches already done in its epoch (`skip_first_batches`); the batch
  order and the random crops are seeded by (seed, epoch), so the resumed run sees what the uninterrupted one
  would have. No pickle is written by this module (accelerate's own RNG/optimizer files aside).
* The best epoch's backbone is saved with `save_pretrained` to OUT/backbone (so `AutoModel.from_pretrained`
  and `avb dump --model OUT/backbone` load it) and its head to OUT/head.safetensors, each time validation
  improves -- so they survive a crash and always hold the best epoch, not the last. The export follows the
  checkpoint of that step (never precedes it), so after a kill -9 the export and metrics.json's `best` agree.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import Tensor, nn

from cache.command_kit.atomic import write_json_atomic, written_via
from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.jsonable import jsonable
from cache.command_kit.lock import hold_output
from cache.command_kit.options import progress_option
from extract.clips import (
    ClipDataset,
    EpochShuffleSampler,
    collate_clips,
    loader_options,
)
from extract.run_config import (
    AUTO_WORKERS,
    PRECISIONS,
    ClipRunConfig,
    clip_input_options,
    decoded_audio_setting,
)
from heads.names import ARCHS, CLIP_SECONDS, DEFAULT_EPOCHS, WEIGHTINGS
from heads.runs import (
    BACKBONE_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINETUNE_FORMAT,
    FINETUNE_KIND,
    HEAD_FILE,
    METRICS_FILE,
    TRAINED_ON_FILE,
    history_entry,
    read_history,
)
from heads.training.tracking import REPORT_TO_CHOICES

CHECKPOINT = re.compile(r"^step-(\d{8,})$")
TRACKER_PROJECT = "finetune"      # accelerate's project name: TensorBoard logs go to OUT/tracking/finetune
STATE_FILE = "train_state.json"


class FinetuneError(AvbError):
    """Bad fine-tuning settings, or an output directory that cannot be used; one line for the user."""


@dataclass
class FinetuneConfig(ClipRunConfig):
    """Everything a fine-tuning run depends on; defaults are the paper's settings."""

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 8               # per process and micro-batch
    eval_batch_size: int = 16
    lr_backbone: float = 1e-5
    lr_head: float = 1e-3             # also the loss weighting's learnable alpha
    weight_decay: float = 0.01        # AdamW's default; not applied to the weighting's alpha
    grad_clip: float = 5.0            # max global gradient norm per optimizer step, as the heads use (0: none)
    plateau_patience: int = 5         # halve the LRs after this many epochs without a better Val mean score
    plateau_factor: float = 0.5
    clip_seconds: float = CLIP_SECONDS
    spec_time_p: float = 0.05
    spec_feature_p: float = 0.05
    mask_time_length: int = 10
    mask_feature_length: int = 10
    arch: str = "vanilla"
    input_layer: str = "last"
    hidden: int = 256
    dropout: float = 0.3
    weighting: str = "uniform"
    freeze_cnn: bool = False
    grad_accum: int = 1
    mixed_precision: str = "no"
    max_steps: int = 0                # optimizer steps; 0 = no limit
    seed: int = 0
    folds: int = 0                    # > 0: fine-tune for one round of speaker-independent cross-validation
    fold: int = 0                     #   (heads.training.folds): train on its train folds, select on its select
    fold_seed: int = 0                #   fold; the eval fold stays unseen, as stage 2's --folds/--fold expect
    keep_checkpoints: int = 2
    resume: bool = False
    report_to: str = "none"           # trackers (heads.training.tracking): none, tensorboard, wandb, mlflow, all
    tracking_dir: str = ""            # where they write; "" = OUT/tracking

    # Fields that may change between a run and its --resume; every other field must match.
    RESUMABLE_CHANGES = ("epochs", "max_steps", "num_workers", "decoded_audio", "eval_batch_size", "keep_checkpoints", "resume",
                         "report_to", "tracking_dir")

    def validate(self) -> None:
        if not (self.corpus or self.spec) or not self.out:
            raise FinetuneError("a corpus (--corpus or --spec) and --out are required")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "keep_checkpoints", "hidden"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < AUTO_WORKERS:
            raise FinetuneError(f"--num-workers must be >= 0 (or {AUTO_WORKERS}: from the machine), got "
                                f"{self.num_workers}")
        for name in ("max_steps", "plateau_patience"):
            if getattr(self, name) < 0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_backbone", "lr_head", "clip_seconds"):
            if not getattr(self, name) > 0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise FinetuneError(f"--grad-clip must be a finite number >= 0, got {self.grad_clip}")
        for name in ("spec_time_p", "spec_feature_p", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise FinetuneError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.mixed_precision not in PRECISIONS:
            raise FinetuneError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {self.mixed_precision!r}")
        if self.arch not in ARCHS:
            raise FinetuneError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.weighting not in WEIGHTINGS:
            raise FinetuneError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        from heads.model.weighting import WEIGHTINGS as WEIGHTING_CLASSES  # noqa: PLC0415

        if WEIGHTING_CLASSES[self.weighting].measures_steps:
            raise FinetuneError(f"--weighting {self.weighting} measures every step with a second forward pass, "
                                "through the whole backbone here; it is for heads on cached features (avb heads "
                                "train, ablate, search)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FinetuneModel(nn.Module):
    """Backbone -> masked-mean pooled layers -> multi-task head (R = 1) -> task losses -> weighted total."""

    def __init__(self, backbone: nn.Module, head: nn.Module, weighting: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.weighting = weighting

    def forward(self, waves: Tensor, mask: Tensor, targets: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """outputs: task -> [B, out_dim]; with targets ({task: [B, label_dim]}) also loss and task_losses [K]."""
        from extract.backbone import forward_layers
        from heads.model.architectures import HeadInputs
        from heads.model.losses import task_losses

        pooled, _, _ = forward_layers(self.backbone, waves, mask)
        inputs = HeadInputs(pooled={name: pooled[name][None] for name in self.head.required_layers})
        stacked = None if targets is None else {task: y[None] for task, y in targets.items()}
        outputs = self.head(inputs, stacked)
        result: dict[str, Any] = {"outputs": {task: out[0] for task, out in outputs.items()}}
        if stacked is not None:
            losses = task_losses(self.head.tasks, outputs, stacked)    # [1, K]
            result["task_losses"] = losses[0]
            result["loss"] = self.weighting(losses)[0]
        return result


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Progress that is not in the model/optimizer: saved as JSON beside each checkpoint."""

    epoch: int = 0                  # completed epochs
    batches_in_epoch: int = 0       # micro-batches of the current epoch already trained (per process)
    step: int = 0                   # optimizer steps so far
    world: int = 1                  # processes that trained the current epoch
    loss_sum: float = 0.0           # sums over the current epoch's micro-batches, all processes
    task_loss_sum: tuple[float, ...] = ()   # per task, in the corpus's task order
    n_batches: int = 0
    history: list[dict] = field(default_factory=list)   # one heads.runs.history_entry per validation
    best: dict | None = None        # the history entry of the best validation so far
    scheduler: dict | None = None   # the plateau schedule's bookkeeping (GroupPlateau.state_dict)

    def __post_init__(self) -> None:
        self.task_loss_sum = tuple(self.task_loss_sum)

    @classmethod
    def load(cls, path: Path) -> "TrainState":
        """The state of a checkpoint, as `save` wrote it."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            state = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
            state.history = read_history({"history": state.history})
            return state
        except (OSError, ValueError, TypeError) as err:
            raise FinetuneError(f"{path}: unreadable training state ({err})") from None


class GroupPlateau:
    """Halve every learning rate of a torch optimizer when the Val score stops improving (`--plateau-*`).

    The bookkeeping is heads.model.optim.PlateauHalving's, with the optimizer's parameter groups as its runs, all fed
    the same score: so each group's rate drops on the same epochs, exactly as torch's
    ReduceLROnPlateau(mode="max") would drop it. `lr` is the [G] view of the groups' rates PlateauHalving reads
    and writes; the groups are read again at each step (loading an optimizer state replaces them).
    """

    def __init__(self, optimizer: Any, *, patience: int, factor: float) -> None:
        from heads.model.optim import PlateauHalving

        self.optimizer = optimizer
        self.n_runs = len(optimizer.param_groups)
        self.lr = torch.tensor([g["lr"] for g in optimizer.param_groups], dtype=torch.float64)
        self.plateau = PlateauHalving(self, patience=patience, factor=factor)

    def step(self, score: float) -> None:
        """One validation score (higher is better; pass -inf for a non-finite one)."""
        groups = self.optimizer.param_groups
        self.lr.copy_(torch.tensor([g["lr"] for g in groups], dtype=torch.float64))
        self.plateau.step(np.full(self.n_runs, score, dtype=np.float64))
        for group, lr in zip(groups, self.lr.tolist()):
            group["lr"] = lr

    def state_dict(self) -> dict[str, list]:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a `state_dict` (None: a checkpoint taken before the first validation)."""
        if state:
            self.plateau.load_state_dict(state)


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary `.tmp-*` folders are never considered)."""
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------- helpers
def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (rename; the old one is removed only after)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers: about what saving its weights writes."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def save_best(unwrapped: FinetuneModel, out: Path, step: int | None = None,
              trained_on: dict[str, Any] | None = None) -> None:
    """OUT/backbone (save_pretrained) and OUT/head.safetensors, each replaced atomically; `trained_on` (the
    corpus and the ids the backbone was trained on) goes into the backbone folder, so that a dump from it can
    mark those clips and stage 2 can refuse to evaluate on them.

    The head is written last and records the optimizer step it was exported at (`exported_step`), so a resumed
    run can tell whether the export of its newest checkpoint was interrupted.
    """
    from safetensors.torch import save_file

    from cache.command_kit.atomic import atomic_path

    tmp = out / ".backbone.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with written_via(tmp, out / BACKBONE_DIR, state_bytes(unwrapped.backbone)):
        unwrapped.backbone.save_pretrained(tmp)
        if trained_on is not None:
            (tmp / TRAINED_ON_FILE).write_text(json.dumps(trained_on), encoding="utf-8")
        _replace_dir(tmp, out / BACKBONE_DIR)
    state = {k: v.detach().float().cpu().contiguous() for k, v in unwrapped.head.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_path(out / HEAD_FILE, suffix=".safetensors", size=size) as path:
        save_file(state, str(path), metadata={"format": "pt", **({"step": str(step)} if step is not None else {})})


def exported_step(out: Path) -> int | None:
    """The step whose weights OUT/backbone and OUT/head.safetensors hold (None: no complete export)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(out / HEAD_FILE), framework="pt") as handle:
            return int((handle.metadata() or {})["step"])
    except (OSError, SafetensorError, KeyError, ValueError):  # missing, damaged or written without the step
        return None


def _generator_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"head_dropout_rng_{rank}.safetensors"


def _check_resume_config(saved_path: Path, cfg: FinetuneConfig) -> None:
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FinetuneError(f"{saved_path}: unreadable ({err})") from None
    current = cfg.to_json()
    for key, value in current.items():
        if key in FinetuneConfig.RESUMABLE_CHANGES or key not in saved:
            continue
        if saved[key] != value:
            raise FinetuneError(f"--resume with {key}={value!r}, but {saved_path} was trained with "
                                f"{key}={saved[key]!r}; use the same settings or another --out")


def _train_rows(corpus: Any) -> np.ndarray:
    """Train rows with every task labelled (a clip missing a label cannot give every task's loss)."""
    rows = corpus.indices("Train")
    known = np.ones(len(rows), dtype=bool)
    for task in corpus.tasks.names:
        known &= ~np.isnan(corpus.labels[task][rows]).any(axis=1)
    return rows[known]


def _step_values(step_sums: Tensor, unwrapped: FinetuneModel, optimizer: Any) -> dict[str, float]:
    """What one optimizer step logs (heads.training.tracking names): this process's mean loss over the step's
    micro-batches, each task's loss and loss weight, and both learning rates."""
    names = unwrapped.head.tasks.names
    n = max(1.0, float(step_sums[-1]))
    values = {"train/loss": float(step_sums[0]) / n,
              **{f"train/loss_{task}": float(step_sums[1 + k]) / n for k, task in enumerate(names)},
              "lr/backbone": float(optimizer.param_groups[0]["lr"]), "lr/head": float(optimizer.param_groups[-1]["lr"])}
    weights = unwrapped.weighting.weights()[0].tolist()
    values.update({f"loss_weight/{task}": float(w) for task, w in zip(names, weights)})
    return values


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _clip_or_stop(accelerator: Any, model: nn.Module, cfg: FinetuneConfig, epoch: int, step: int) -> None:
    """Clip the global gradient norm to cfg.grad_clip, and stop on a non-finite one before it reaches the weights.

    One exploding batch must not wreck the backbone (or fill AdamW's second moment with ~g^2 that freezes it
    for thousands of steps), and a NaN loss must stop the run with a clear error rather than write NaN weights
    and predictions. The norm is taken after DDP's all-reduce, so every rank sees the same value and they all
    stop together. Under fp16 the GradScaler already skips steps whose gradients overflow, so it is left to it.
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if cfg.mixed_precision != "fp16" and norm is not None and not math.isfinite(float(norm)):
        raise FinetuneError(f"epoch {epoch + 1}, step {step}: gradient norm is {float(norm)}; training stopped "
                            "before the update (check the audio and labels, or lower the learning rates)")


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, corpus: Any, *, progress: bool = False
             ) -> tuple[dict[str, float], np.ndarray, dict[str, np.ndarray]]:
    """Scores over the whole split behind `loader` (rows, predictions in gathered order), same on every rank."""
    from tqdm.auto import tqdm

    from heads.metrics import score_all

    model.eval()
    rows: list[np.ndarray] = []
    names = corpus.tasks.names
    preds: dict[str, list[np.ndarray]] = {task: [] for task in names}
    for batch in tqdm(loader, desc="val", unit="batch", leave=False, disable=not progress):
        result = model(batch["waves"], batch["mask"])
        gathered = accelerator.gather_for_metrics(
            {"rows": batch["rows"], "outputs": {task: out.float() for task, out in result["outputs"].items()}}
        )
        rows.append(gathered["rows"].cpu().numpy())
        for task in names:
            preds[task].append(gathered["outputs"][task].cpu().numpy())
    all_rows = np.concatenate(rows)
    all_preds = {task: np.concatenate(p) for task, p in preds.items()}
    labels = {task: corpus.labels[task][all_rows] for task in names}
    return score_all(corpus.tasks, labels, all_preds), all_rows, all_preds


# ---------------------------------------------------------------------------------------------- training
def run_finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) one fine-tuning run; every process calls this. Returns the metrics dict."""
    cfg.validate()
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        ProjectConfiguration,
        set_seed,
    )

    from extract.backbone import load_backbone, make_accelerator
    from extract.description import open_corpus
    from heads.training.tracking import TRACKING_DIR, resolve_report_to

    out = Path(cfg.out)
    trackers = resolve_report_to(cfg.report_to)     # before any work: a missing package is found at once
    log_dir = Path(cfg.tracking_dir) if cfg.tracking_dir else out / TRACKING_DIR
    ckpt_root = out / CHECKPOINTS_DIR
    latest = latest_checkpoint(ckpt_root)
    if latest is not None and not cfg.resume:
        raise FinetuneError(f"{out} already holds checkpoints ({latest.name}); pass --resume to continue that run "
                            "or choose another --out")
    if cfg.resume and latest is not None and (out / CONFIG_FILE).exists():
        _check_resume_config(out / CONFIG_FILE, cfg)

    corpus = open_corpus(cfg.corpus or None, cfg.spec or None)
    if cfg.folds:
        from heads.training.folds import plan_folds, splits_for_fold

        folds = plan_folds(corpus.groups, corpus.tasks, corpus.labels, cfg.folds, seed=cfg.fold_seed)
        corpus = replace(corpus, splits=splits_for_fold(folds, cfg.fold, cfg.folds))
    train_rows, val_rows = _train_rows(corpus), corpus.indices("Val")
    if len(val_rows) == 0:
        raise FinetuneError(f"corpus {corpus.root} has no Val clips to select the best epoch on")

    set_seed(cfg.seed)   # same initial weights on every rank (DDP also broadcasts them)
    backbone = load_backbone(cfg.model, spec_time_p=cfg.spec_time_p, spec_feature_p=cfg.spec_feature_p,
                             mask_time_length=cfg.mask_time_length, mask_feature_length=cfg.mask_feature_length,
                             freeze_cnn=cfg.freeze_cnn)
    if cfg.spec_time_p == 0 and getattr(backbone, "masked_spec_embed", None) is not None:
        backbone.masked_spec_embed.requires_grad_(False)   # never used without time masking
    # LayerDrop is off (see load_backbone), so every trainable parameter gets a gradient in every step and DDP
    # need not search the graph for unused ones.
    accelerator = make_accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(log_dir)),
    )
    # One lock for all ranks (rank 0 holds it): a second run into the same --out stops before writing anything.
    with hold_output(out, ranks=accelerator):
        run = Finetuning(cfg, accelerator, corpus, backbone, train_rows, val_rows, trackers, log_dir,
                         progress=progress)
        run.resume(latest)
        return run.train()


class Finetuning:
    """The rest of `run_finetune`, run while it holds the output's lock, as the steps a reader follows:

        run = Finetuning(...)   # setup: head, optimizer, plateau schedule, data, accelerate's prepare
        run.resume(latest)      # the newest checkpoint, or a fresh seed
        run.train()             # config.json and trackers, then per epoch:
            train_epoch()       #   train steps (gradient accumulation, clipping, step logs)
            validate()          #   history entry, best so far, loss-weighting and plateau steps at the epoch end
            checkpoint()        #   save_state + train_state.json, committed by a rename
            export_best()       #   save_pretrained backbone + head, when validation improved
            write_metrics()     #   metrics.json
    """

    def __init__(self, cfg: FinetuneConfig, accelerator: Any, corpus: Any, backbone: nn.Module,
                 train_rows: np.ndarray, val_rows: np.ndarray, trackers: list[str], log_dir: Path, *,
                 progress: bool) -> None:
        self.cfg, self.accelerator, self.corpus = cfg, accelerator, corpus
        self.trained_on = {"corpus": corpus.name, "ids": [corpus.ids[i] for i in train_rows]}
        self.trackers, self.log_dir = trackers, log_dir
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / CHECKPOINTS_DIR
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        if len(train_rows) < cfg.batch_size * self.world:
            raise FinetuneError(f"corpus {corpus.root} has {len(train_rows)} fully labelled Train clips, fewer than "
                                f"one batch per process ({cfg.batch_size} x {self.world})")
        self.show = progress and accelerator.is_local_main_process
        model = self._build_model(backbone)
        optimizer = self._build_optimizer(model)
        self.plateau = GroupPlateau(optimizer, patience=cfg.plateau_patience, factor=cfg.plateau_factor)
        train_loader, val_loader = self._build_loaders(train_rows, val_rows)
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        self.unwrapped: FinetuneModel = accelerator.unwrap_model(self.model)
        self.state = TrainState(world=self.world)
        self.stop = False

    # ------------------------------------------------------------------ setup
    def _build_model(self, backbone: nn.Module) -> FinetuneModel:
        """Backbone + head (one run) + loss weighting; the head's dropout masks come from a generator per rank
        (different samples, different masks), saved in the checkpoints."""
        from extract.backbone import layer_dims
        from heads.model.architectures import HeadConfig, build_head
        from heads.model.weighting import build_weighting

        cfg = self.cfg
        self.dims = layer_dims(backbone)
        tasks = self.corpus.tasks
        self.head_cfg = HeadConfig(arch=cfg.arch, hidden=cfg.hidden, dropout=cfg.dropout, input_layer=cfg.input_layer,
                                   chain_order=tasks.names)
        head = build_head(self.head_cfg, self.dims, [cfg.seed], tasks)
        self.dropout_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (self.rank + 1))
        head.set_run_generators([self.dropout_gen])
        weighting = build_weighting(cfg.weighting, 1, len(tasks))
        weighting.set_run_seeds([cfg.seed])
        return FinetuneModel(backbone, head, weighting)

    def _build_optimizer(self, model: FinetuneModel) -> torch.optim.Optimizer:
        """AdamW: the backbone at its LR, the head and the weighting's alpha (no weight decay) at the head's."""
        cfg = self.cfg
        groups = [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.lr_backbone},
            {"params": list(model.head.parameters()), "lr": cfg.lr_head},
            {"params": list(model.weighting.parameters()), "lr": cfg.lr_head, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    def _build_loaders(self, train_rows: np.ndarray, val_rows: np.ndarray) -> tuple[Any, Any]:
        """Random crops in a (seed, epoch) order for training; the whole of Val, first windows, for validation."""
        from torch.utils.data import DataLoader

        from extract.decoded_audio import open_store

        cfg = self.cfg
        store = open_store(self.corpus, cfg.decoded_audio, say=self.accelerator.print)   # said by rank 0 only
        options = loader_options(cfg.num_workers, self.accelerator.device)
        self.train_set = ClipDataset(self.corpus, train_rows, clip_seconds=cfg.clip_seconds, train=True,
                                     seed=cfg.seed, store=store)
        train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, drop_last=True, collate_fn=collate_clips,
                                  sampler=EpochShuffleSampler(len(self.train_set), cfg.seed), **options)
        val_set = ClipDataset(self.corpus, val_rows, clip_seconds=cfg.clip_seconds, store=store)
        val_loader = DataLoader(val_set, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_clips,
                                **options)
        return train_loader, val_loader

    # ------------------------------------------------------------------ resume
    def resume(self, latest: Path | None) -> None:
        """Continue from `latest` under --resume, else start afresh (SpecAugment masks differ between ranks)."""
        from accelerate.utils import set_seed

        if self.cfg.resume and latest is not None:
            self._load_checkpoint(latest)
        else:
            if self.cfg.resume and self.accelerator.is_main_process:
                _log(f"--resume: no checkpoint under {self.ckpt_root}; starting a new run")
            set_seed(self.cfg.seed, device_specific=True)
        self.state.world = self.world

    def _load_checkpoint(self, latest: Path) -> None:
        """Model, optimizer and RNG states (accelerate), the progress and plateau state, the dropout generator."""
        from safetensors.torch import load_file

        accelerator = self.accelerator
        accelerator.load_state(str(latest))
        state = self.state = TrainState.load(latest / STATE_FILE)
        if state.batches_in_epoch and state.world != self.world:
            raise FinetuneError(f"{latest} stopped inside epoch {state.epoch + 1} with {state.world} processes; "
                                f"resume it with the same number of processes (got {self.world})")
        self.plateau.load_state_dict(state.scheduler)
        gen_file = _generator_file(latest, self.rank)
        if gen_file.exists():
            self.dropout_gen.set_state(load_file(str(gen_file))["state"])
        if not accelerator.is_main_process:   # the epoch's sums so far are counted once, on rank 0
            state.loss_sum, state.task_loss_sum, state.n_batches = 0.0, (0.0,) * len(self.corpus.tasks), 0
        if accelerator.is_main_process:
            _log(f"resuming from {latest} (epoch {state.epoch + 1}, step {state.step})")

    # ------------------------------------------------------------------ the epochs
    def train(self) -> dict[str, Any]:
        """config.json and the trackers, then epochs until --epochs or --max-steps; the final metrics."""
        self._start()
        while self.state.epoch < self.cfg.epochs and not self.stop:
            sums = self.train_epoch()
            improved = self.validate(sums)
            self.checkpoint()
            if improved:
                self.export_best()
            self.write_metrics()
        metrics = self.write_metrics()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return metrics

    def _start(self) -> None:
        from heads.training.tracking import accelerate_init_kwargs, flat_config

        cfg, state, out = self.cfg, self.state, self.out
        if self.accelerator.is_main_process:
            write_json_atomic(out / CONFIG_FILE, {**cfg.to_json(), "head": asdict(self.head_cfg),
                                                    "layer_dims": self.dims, "processes": self.world,
                                                    "tasks": self.corpus.tasks.to_json(),
                                                    "kind": FINETUNE_KIND, "finetune_format": FINETUNE_FORMAT})
        if self.trackers:   # TensorBoard: OUT/tracking/finetune; a resumed run replaces the steps it redoes
            self.accelerator.init_trackers(
                TRACKER_PROJECT, config=flat_config(cfg.to_json()),
                init_kwargs=accelerate_init_kwargs(self.trackers, self.log_dir, out.name,
                                                   purge_step=state.step + 1 if state.step else None))
        # The best weights are exported only after their checkpoint is committed, so the export can lag the
        # newest checkpoint but never run ahead of it: a run killed in between resumes with exactly the weights
        # of its best validation loaded, and finishes the export here.
        if state.best is not None and state.best.get("step") == state.step and exported_step(out) != state.step:
            self.export_best()
        self.stop = bool(cfg.max_steps) and state.step >= cfg.max_steps

    def train_epoch(self) -> Tensor:
        """Train the rest of the current epoch, or up to --max-steps; this process's sums (loss, K task losses,
        micro-batches)."""
        from tqdm.auto import tqdm

        accelerator, state, epoch = self.accelerator, self.state, self.state.epoch
        self.train_set.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
        self.model.train()
        width = 2 + len(self.corpus.tasks)
        sums = torch.zeros(width, dtype=torch.float64)       # loss, K task losses, batches (this process)
        step_sums = torch.zeros(width, dtype=torch.float64)  # the same over the micro-batches of one optimizer step
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch", disable=not self.show,
                   initial=state.batches_in_epoch, total=len(self.train_loader))
        for batch in bar:
            result = self._micro_step(batch)
            state.batches_in_epoch += 1
            batch_sums = torch.cat([result["loss"].detach().float().reshape(1),
                                    result["task_losses"].detach().float(), torch.ones(1)]).cpu().double()
            sums += batch_sums
            step_sums += batch_sums
            if accelerator.sync_gradients:
                state.step += 1
                if self.trackers:
                    accelerator.log(_step_values(step_sums, self.unwrapped, self.optimizer), step=state.step)
                step_sums.zero_()
                bar.set_postfix(loss=f"{result['loss'].detach().item():.4f}", step=state.step)
                if self.cfg.max_steps and state.step >= self.cfg.max_steps:
                    self.stop = True
                    break
        bar.close()
        return sums

    def _micro_step(self, batch: dict) -> dict[str, Any]:
        """Forward and backward of one micro-batch; the optimizer steps when accelerate's accumulation syncs."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            result = self.model(batch["waves"], batch["mask"], batch["labels"])
            accelerator.backward(result["loss"])
            if accelerator.sync_gradients:
                _clip_or_stop(accelerator, self.model, self.cfg, self.state.epoch, self.state.step + 1)
            self.optimizer.step()
            self.optimizer.zero_grad()
        return result

    # ------------------------------------------------------------------ validate and select
    def validate(self, sums: Tensor) -> bool:
        """Score Val and record the history entry; at an epoch's end step the loss weighting and the plateau
        schedule. Whether this validation is the best so far."""
        state, epoch = self.state, self.state.epoch
        epoch_done = state.batches_in_epoch >= len(self.train_loader)
        task_means = self._epoch_losses(sums)
        weights = self.unwrapped.weighting.weights()[0].tolist()
        scores, _, _ = evaluate(self.accelerator, self.model, self.val_loader, self.corpus, progress=self.show)
        groups = self.optimizer.param_groups
        entry = history_entry(epoch=epoch + 1, step=state.step, partial=not epoch_done,
                              loss=state.loss_sum / max(1, state.n_batches),
                              task_losses=dict(zip(self.corpus.tasks.names, task_means)),
                              weights=dict(zip(self.corpus.tasks.names, weights)),
                              lr={"backbone": groups[0]["lr"], "head": groups[-1]["lr"]}, val=scores)
        state.history.append(entry)
        if self.trackers:
            self.accelerator.log({"epoch": entry["epoch"], **{f"val/{k}": v for k, v in scores.items()}},
                                 step=state.step)
        score = scores.get("mean", float("nan"))
        best_score = None if state.best is None else state.best["val"].get("mean")
        improved = state.best is None or (math.isfinite(score) and (best_score is None or score > best_score))
        if improved:
            state.best = entry
        if epoch_done:
            self.unwrapped.weighting.end_epoch(torch.tensor([task_means], dtype=torch.float32))
            self.plateau.step(score if math.isfinite(score) else float("-inf"))
            state.epoch += 1
            state.batches_in_epoch, state.loss_sum, state.n_batches = 0, 0.0, 0
            state.task_loss_sum = (0.0,) * len(self.corpus.tasks)
        elif not self.accelerator.is_main_process:
            state.loss_sum, state.task_loss_sum, state.n_batches = 0.0, (0.0,) * len(self.corpus.tasks), 0
        if self.accelerator.is_main_process:
            _log(f"epoch {entry['epoch']}{' (partial)' if entry['partial'] else ''} step {state.step}: "
                 f"train loss {entry['loss']:.4f}, val " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return improved

    def _epoch_losses(self, sums: Tensor) -> list[float]:
        """Add this epoch's sums over every process to the state (plus what a resumed epoch had before the
        restart); the mean loss of each task so far."""
        state = self.state
        total = self.accelerator.reduce(sums.float().to(self.accelerator.device), reduction="sum").double().cpu()
        state.loss_sum += float(total[0])
        k = len(self.corpus.tasks)
        sums_before = state.task_loss_sum or (0.0,) * k
        state.task_loss_sum = tuple(float(a + b) for a, b in zip(sums_before, total[1:1 + k].tolist()))
        state.n_batches += int(round(float(total[1 + k])))
        return [s / max(1, state.n_batches) for s in state.task_loss_sum]

    # ------------------------------------------------------------------ checkpoint and export
    def checkpoint(self) -> None:
        """OUT/checkpoints/step-XXXXXXXX: accelerate's save_state, the dropout generator, train_state.json last;
        written under a temporary name and renamed, then all but the newest --keep-checkpoints removed."""
        from safetensors.torch import save_file

        accelerator, state, root = self.accelerator, self.state, self.ckpt_root
        name = f"step-{state.step:08d}"
        tmp, final = root / f".tmp-{name}", root / name
        # model + AdamW's two moments of every trainable parameter; a failure or a signal removes the half folder
        with written_via(tmp, final, 3 * state_bytes(self.unwrapped), remove=accelerator.is_main_process):
            if accelerator.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            save_file({"state": self.dropout_gen.get_state()}, str(_generator_file(tmp, self.rank)))
            state.scheduler = self.plateau.state_dict()
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json_atomic(tmp / STATE_FILE, jsonable(asdict(state)))   # written last: marks it complete
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name)))
            for _, old in done[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def export_best(self) -> None:
        """OUT/backbone + OUT/head.safetensors of the current step (rank 0), after its checkpoint."""
        if self.accelerator.is_main_process:
            save_best(self.unwrapped, self.out, step=self.state.step, trained_on=self.trained_on)
        self.accelerator.wait_for_everyone()

    def write_metrics(self) -> dict[str, Any]:
        """OUT/metrics.json: the best entry and the history (rank 0 writes; every rank returns it)."""
        metrics = jsonable({"best": self.state.best, "history": self.state.history})
        if self.accelerator.is_main_process:
            write_json_atomic(self.out / METRICS_FILE, metrics)
        return metrics


# ---------------------------------------------------------------------------------------------- CLI
@click.command("finetune")
@click.option("--corpus", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root: with a corpus.yaml, or in the official A-VB layout.")
@click.option("--spec", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The corpus.yaml describing the corpus, when it is not <corpus>/corpus.yaml.")
@click.option("--model", default=FinetuneConfig.model, show_default=True,
              help="Pretrained wav2vec2-family checkpoint name or local directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--epochs", default=FinetuneConfig.epochs, show_default=True, type=int)
@click.option("--batch-size", default=FinetuneConfig.batch_size, show_default=True, type=int,
              help="Clips per process and micro-batch.")
@click.option("--eval-batch-size", default=FinetuneConfig.eval_batch_size, show_default=True, type=int)
@click.option("--lr-backbone", default=FinetuneConfig.lr_backbone, show_default=True, type=float)
@click.option("--lr-head", default=FinetuneConfig.lr_head, show_default=True, type=float)
@click.option("--clip-seconds", default=FinetuneConfig.clip_seconds, show_default=True, type=float)
@click.option("--spec-time-p", default=FinetuneConfig.spec_time_p, show_default=True, type=float,
              help="SpecAugment time-masking probability.")
@click.option("--spec-feature-p", default=FinetuneConfig.spec_feature_p, show_default=True, type=float,
              help="SpecAugment feature-masking probability.")
@click.option("--arch", default=FinetuneConfig.arch, show_default=True,
              type=click.Choice(ARCHS, case_sensitive=False))
@click.option("--weighting", default=FinetuneConfig.weighting, show_default=True,
              type=click.Choice(WEIGHTINGS, case_sensitive=False))
@click.option("--freeze-cnn", is_flag=True, help="Do not train the CNN feature encoder.")
@click.option("--grad-accum", default=FinetuneConfig.grad_accum, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--grad-clip", default=FinetuneConfig.grad_clip, show_default=True, type=float,
              help="Clip the global gradient norm to this value (0: no clipping).")
@click.option("--mixed-precision", default=FinetuneConfig.mixed_precision, show_default=True, type=click.Choice(PRECISIONS))
@click.option("--max-steps", default=FinetuneConfig.max_steps, show_default=True, type=int,
              help="Stop (with a checkpoint) after this many optimizer steps; 0 = no limit.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint under OUT/checkpoints.")
@click.option("--seed", default=FinetuneConfig.seed, show_default=True, type=int)
@click.option("--folds", default=FinetuneConfig.folds, show_default=True, type=click.IntRange(min=0),
              help="Speaker-independent cross-validation with this many folds (0: the corpus's splits). With "
                   "--fold k: train on the folds other than k and k+1, select the epoch on fold k+1; fold k stays "
                   "unseen for `avb heads ablate --folds K --fold k` on this backbone's dump.")
@click.option("--fold", default=FinetuneConfig.fold, show_default=True, type=click.IntRange(min=0),
              help="The round k (with --folds).")
@click.option("--fold-seed", default=FinetuneConfig.fold_seed, show_default=True, type=int,
              help="Seed of the fold assignment; stage 2 must use the same.")
@clip_input_options
@click.option("--report-to", default=FinetuneConfig.report_to, show_default=True, type=click.Choice(REPORT_TO_CHOICES),
              help="Experiment tracker(s) through accelerate: per step the train loss, per-task losses and loss "
                   "weights and the learning rates, per epoch every Val score; offline by default ('all': every "
                   "installed one).")
@click.option("--tracking-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the trackers write (default: OUT/tracking; TensorBoard: OUT/tracking/finetune).")
@progress_option()
def finetune_command(corpus: Path | None, spec: Path | None, model: str, out: Path, epochs: int, batch_size: int,
                     eval_batch_size: int, lr_backbone: float, lr_head: float, clip_seconds: float,
                     spec_time_p: float, spec_feature_p: float, arch: str, weighting: str, freeze_cnn: bool,
                     grad_accum: int, grad_clip: float, mixed_precision: str, max_steps: int, resume: bool,
                     seed: int, folds: int, fold: int, fold_seed: int, num_workers: int, decoded_audio: str | None,
                     no_decoded_audio: bool, report_to: str,
                     tracking_dir: Path | None, progress: bool) -> None:
    """Fine-tune a wav2vec2 backbone and a multi-task head on the corpus's tasks (stage 1).

    Run under `accelerate launch -m extract.finetune ...` for several GPUs. Writes OUT/backbone (the best
    epoch, loadable with AutoModel.from_pretrained), OUT/head.safetensors, OUT/config.json, OUT/metrics.json
    and OUT/checkpoints/.
    """
    cfg = FinetuneConfig(corpus=str(corpus or ""), spec=str(spec or ""), model=str(model), out=str(out),
                         epochs=epochs, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, lr_backbone=lr_backbone, lr_head=lr_head,
                         clip_seconds=clip_seconds, spec_time_p=spec_time_p, spec_feature_p=spec_feature_p,
                         arch=arch.lower(), weighting=weighting.lower(), freeze_cnn=freeze_cnn, grad_accum=grad_accum,
                         grad_clip=grad_clip, mixed_precision=mixed_precision, max_steps=max_steps, resume=resume,
                         seed=seed, folds=folds, fold=fold, fold_seed=fold_seed, num_workers=num_workers,
                     decoded_audio=decoded_audio_setting(decoded_audio, no_decoded_audio),
                         report_to=report_to,
                         tracking_dir=str(tracking_dir) if tracking_dir else "")
    with command_errors():  # FinetuneError, CorpusError, BackboneLoadError, write errors, SIGINT/SIGTERM, ...
        metrics = run_finetune(cfg, progress=progress)
    best = metrics.get("best") or {}
    if best and os.environ.get("RANK", "0") == "0":
        click.echo(f"best epoch {best['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in best["val"].items()
                                                                if v is not None))


def main() -> None:
    finetune_command(prog_name="python -m extract.finetune")


if __name__ == "__main__":
    main()
