"""`avb heads train` (one run) and `avb heads ablate` (the grid) from a feature cache.

Heavy imports (torch, h5py) happen inside the commands, so `avb heads --help` stays fast. The options' defaults
are the config dataclasses' (HeadConfig, TrainConfig, GridConfig), read when click first needs them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import click

from cache.command_kit.command import command_errors
from cache.command_kit.lock import hold_output
from cache.command_kit.options import ConfigDefault, csv_text, progress_option
from heads.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_N_BOOT
from heads.names import ARCHS, DEFAULT_MAX_GROUP_MIB, HEAD_PRECISIONS, WEIGHTINGS
from heads.runs import CONFIG_FILE, RESULTS_CSV, RESULTS_JSON, RESULTS_MD
from heads.training.tracking import REPORT_TO_CHOICES

HEAD = "heads.model.architectures:HeadConfig."
TRAIN = "heads.training.joint:TrainConfig."
GRID = "heads.training.grid:GridConfig."
INPUT_LAYER_HELP = "Pooled layer feeding VANILLA/CHAIN: 'last', 'weighted' (learned mix of all layers) or a name."


def _csv_list(text: str, what: str, choices: tuple[str, ...] | None = None) -> list[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter(f"give at least one {what}")
    for item in items:
        if choices is not None and item not in choices:
            raise click.BadParameter(f"unknown {what} {item!r}; expected one of {', '.join(choices)}")
    return items


def _seed_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text, "seed")]
    except ValueError:
        raise click.BadParameter(f"seeds must be integers separated by commas, got {text!r}") from None


def _head_config(hidden: int, dropout: float, input_layer: str, chain_order: str, n_heads: int,
                 branch_blocks: int, branch_frames: bool):
    from heads.model.architectures import HeadConfig  # noqa: PLC0415

    if not 0.0 <= dropout < 1.0:
        raise click.BadParameter(f"dropout must be in [0, 1), got {dropout}", param_hint="--dropout")
    # checked against the cache's tasks once it is read (HeadConfig.validate)
    order = tuple(part.strip().lower() for part in chain_order.split(",") if part.strip())
    return HeadConfig(hidden=hidden, dropout=dropout, input_layer=input_layer, chain_order=order,
                      n_heads=n_heads, branch_blocks=branch_blocks, branch_use_frames=branch_frames)


@contextlib.contextmanager
def _tracking(report_to: str, tracking_dir: Path | None, out: Path, config_path) -> Iterator[object | None]:
    """A HeadsTracker for --report-to (None for 'none'), closed on the way out; each run's config.json is
    stored with its log."""
    from heads.runs import read_json_object  # noqa: PLC0415
    from heads.training.tracking import TRACKING_DIR, HeadsTracker, resolve_report_to  # noqa: PLC0415

    names = resolve_report_to(report_to)
    tracker = (HeadsTracker(names, tracking_dir or out / TRACKING_DIR, lambda run: read_json_object(config_path(run)))
               if names else None)
    try:
        yield tracker
    finally:
        if tracker is not None:
            tracker.close()


def _fold_options(func):
    """Speaker-independent cross-validation (heads.training.crossval), shared by `train` and `ablate`."""
    options = [
        click.option("--folds", default=ConfigDefault(GRID + "folds"), show_default=True, type=click.IntRange(min=0),
                     help="Speaker-independent cross-validation with K group-disjoint folds of the cache's clips "
                          "(0: the cache's own splits): round k trains on the folds other than k and k+1, selects "
                          "on fold k+1 and is scored on fold k. ablate: OUT/fold-k per round, OUT/crossval.md."),
        click.option("--fold", default=None, type=click.IntRange(min=0),
                     help="Only round k (with --folds; train: required), e.g. on the dump of "
                          "`avb finetune --folds K --fold k`."),
        click.option("--fold-seed", default=ConfigDefault(GRID + "fold_seed"), show_default=True, type=int,
                     help="Seed of the fold assignment (the same as the fine-tuning's)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _weighting_options(specs: tuple[str, ...]) -> dict[str, float]:
    """KEY=VALUE pairs of --weighting-option (checked against the weighting when it is built)."""
    options = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected KEY=NUMBER, got {spec!r}", param_hint="--weighting-option") from None
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=NUMBER, got {spec!r}", param_hint="--weighting-option")
    return options


def _check_fold_options(folds: int, fold: int | None, *, one_round: bool) -> None:
    if fold is not None and not folds:
        raise click.BadParameter("--fold needs --folds K", param_hint="--fold")
    if one_round and folds and fold is None:
        raise click.BadParameter("avb heads train runs one round: give --fold k (avb heads ablate --folds K runs "
                                 "every round)", param_hint="--fold")


def _head_options(func):
    """Options shared by `train` and `ablate` that shape the head (defaults = the paper's)."""
    options = [
        click.option("--hidden", type=int, default=ConfigDefault(HEAD + "hidden"), show_default=True,
                     help="Task-network hidden width / attention dim."),
        click.option("--dropout", type=float, default=ConfigDefault(HEAD + "dropout"), show_default=True,
                     help="Dropout in the heads."),
        click.option("--input-layer", type=str, default=ConfigDefault(HEAD + "input_layer"), show_default=True,
                     help=INPUT_LAYER_HELP),
        click.option("--chain-order", type=str, default=ConfigDefault(HEAD + "chain_order", csv_text),
                     show_default=True, help="CHAIN task order: a permutation of the cache's tasks (default: "
                     "their order; A-VB: type,two,high,culture)."),
        click.option("--n-heads", type=int, default=ConfigDefault(HEAD + "n_heads"), show_default=True,
                     help="BRANCH attention heads."),
        click.option("--branch-blocks", type=int, default=ConfigDefault(HEAD + "branch_blocks"), show_default=True,
                     help="BRANCH attention blocks per task."),
        # a literal (tests/test_cli.py holds it equal to HeadConfig's): click before 8.5 reads a flag's default
        # when the option is defined, and a ConfigDefault would import torch with this module
        click.option("--branch-frames/--branch-layers", default=False, show_default=True,
                     help="BRANCH attends over frames (needs a frame-level cache) or per-layer pooled tokens."),
        click.option("--epochs", type=int, default=ConfigDefault(TRAIN + "epochs"), show_default=True,
                     help="Training epochs."),
        click.option("--batch-size", type=int, default=ConfigDefault(TRAIN + "batch_size"), show_default=True,
                     help="Training batch size."),
        click.option("--lr", type=float, default=ConfigDefault(TRAIN + "lr"), show_default=True,
                     help="Head learning rate (AdamW)."),
        click.option("--weight-decay", type=float, default=ConfigDefault(TRAIN + "weight_decay"), show_default=True,
                     help="AdamW weight decay of the heads (never of the loss-weighting parameters)."),
        click.option("--grad-clip", type=float, default=ConfigDefault(TRAIN + "grad_clip"), show_default=True,
                     help="Per-run maximum gradient norm (0: no clipping)."),
        click.option("--patience", type=int, default=ConfigDefault(TRAIN + "patience"), show_default=True,
                     help="Epochs without a better Val mean before the LR is multiplied by --lr-factor."),
        click.option("--lr-factor", type=float, default=ConfigDefault(TRAIN + "lr_factor"), show_default=True,
                     help="The plateau schedule's LR factor."),
        click.option("--device", default="auto", show_default=True,
                     help="Where the heads train: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps. "
                          "Under `accelerate launch` each process takes its own GPU."),
        click.option("--precision", type=click.Choice(HEAD_PRECISIONS), default=ConfigDefault(TRAIN + "precision"),
                     show_default=True,
                     help="bf16: the heads' matmuls under bf16 autocast (for GPUs; parameters stay float32)."),
        progress_option(),
        click.option("--report-to", type=click.Choice(REPORT_TO_CHOICES, case_sensitive=False), default="none",
                     show_default=True, help="Experiment tracker(s) for per-epoch losses, loss weights, LR and "
                                             "Val scores; one log per run; offline by default ('all': every "
                                             "installed one)."),
        click.option("--tracking-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Where the trackers write (default: OUT/tracking; TensorBoard: one folder per run)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group("heads", context_settings={"help_option_names": ["-h", "--help"]})
def heads_group() -> None:
    """Train heads x loss weightings from a feature cache (stage 2)."""


@heads_group.command("train")
@click.option("--cache", "cache_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HDF5 feature cache written by `avb dump`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: config.json, head.safetensors, predictions/, metrics.json.")
@click.option("--arch", type=click.Choice(ARCHS, case_sensitive=False), default=ConfigDefault(TRAIN + "arch"),
              show_default=True)
@click.option("--weighting", type=click.Choice(WEIGHTINGS, case_sensitive=False),
              default=ConfigDefault(TRAIN + "weighting"), show_default=True,
              help="Loss weighting across the tasks.")
@click.option("--seed", type=int, default=ConfigDefault(TRAIN + "seed"), show_default=True,
              help="Seeds the head's initialisation, shuffling and dropout.")
@click.option("--weighting-option", "weighting_option", multiple=True, metavar="KEY=VALUE",
              help="An option of the loss weighting (repeatable), e.g. beta=0.5 for druw, temperature=2 for dwa.")
@_fold_options
@_head_options
def train_command(cache_path: Path, out: Path, arch: str, weighting: str, seed: int, weighting_option: tuple[str, ...],
                  folds: int, fold: int | None, fold_seed: int, hidden: int, dropout: float,
                  input_layer: str, chain_order: str, n_heads: int, branch_blocks: int, branch_frames: bool,
                  epochs: int, batch_size: int, lr: float, weight_decay: float, grad_clip: float, patience: int,
                  lr_factor: float, device: str, precision: str, progress: bool, report_to: str,
                  tracking_dir: Path | None) -> None:
    """Train one head run on the cache's Train split, select its best epoch on Val, predict Val and Test."""
    _check_fold_options(folds, fold, one_round=True)
    head = _head_config(hidden, dropout, input_layer, chain_order, n_heads, branch_blocks, branch_frames)
    with (command_errors(), hold_output(out),   # the run folder is locked while it is written
          _tracking(report_to, tracking_dir, out, lambda run: out / CONFIG_FILE) as tracker):
        from cache.reader import FrameReader, load_cache  # noqa: PLC0415
        from heads.model.architectures import with_chain_order  # noqa: PLC0415
        from heads.tasks import TaskError, tasks_of  # noqa: PLC0415
        from heads.training.device import resolve_device  # noqa: PLC0415
        from heads.training.joint import TrainConfig, train_runs  # noqa: PLC0415

        train_device = resolve_device(device)   # the one resolution; a missing device fails before anything loads
        cfg = TrainConfig(arch=arch, weighting=weighting, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, grad_clip=grad_clip, patience=patience, lr_factor=lr_factor,
                          head=head, precision=precision, weighting_options=_weighting_options(weighting_option))
        cache = load_cache(cache_path)
        tasks = tasks_of(cache.attrs, str(cache_path))
        if folds:   # one round of cross-validation: the cache's splits as that round sees them
            from heads.training.crossval import plan  # noqa: PLC0415
            from heads.training.folds import round_view  # noqa: PLC0415

            cache = round_view(cache, plan(cache, folds, fold, fold_seed)[0], fold, folds, fold_seed)
        if head.chain_order:   # a usage error, as before task descriptions: checkable once the cache's tasks are known
            try:
                tasks.parse_order(head.chain_order)
            except TaskError as err:
                raise click.BadParameter(str(err), param_hint="--chain-order") from None
        cfg = replace(cfg, head=with_chain_order(head, tasks))
        with (FrameReader(cache.path) if arch == "branch" and branch_frames else contextlib.nullcontext()) as frames:
            metrics = train_runs(cache, [cfg], [out], device=train_device, progress=progress, frames=frames,
                                 tracker=tracker)[0]
    click.echo(f"best epoch {metrics['best_epoch']} of {epochs} (Val):")
    for key in (*tasks.metric_keys, "mean"):
        click.echo(f"  {key:<16} {metrics[key]:.4f}")
    click.echo(f"wrote {out}")


@heads_group.command("ablate")
@click.option("--cache", "cache_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HDF5 feature cache written by `avb dump`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Grid folder: one run folder per arch-weighting-seed, results.csv/.json/.md, config.json.")
@click.option("--archs", type=str, default=ConfigDefault(GRID + "archs", csv_text), show_default=True,
              help="Architectures, comma-separated.")
@click.option("--weightings", type=str, default=ConfigDefault(GRID + "weightings", csv_text), show_default=True,
              help=f"Loss weightings, comma-separated (any of {', '.join(WEIGHTINGS)}).")
@click.option("--seeds", type=str, default=ConfigDefault(GRID + "seeds", csv_text), show_default=True,
              help="Seeds, comma-separated (e.g. 0,1,2).")
@click.option("--max-group-mib", default=None, type=click.IntRange(min=0),
              help="Memory budget of one joint training call in MiB (per run: parameters, gradients, AdamW "
                   "moments, best-epoch copy); an architecture's runs train in as few equal groups as fit. "
                   f"0: no limit. Default: {DEFAULT_MAX_GROUP_MIB} on the CPU, a quarter of the GPU's memory on CUDA.")
@click.option("--ci", default=DEFAULT_LEVEL, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Level of the percentile-bootstrap intervals in results.csv/.json/.md and of the paired "
                   "comparison with the best configuration; 0: none.")
@click.option("--n-boot", default=DEFAULT_N_BOOT, show_default=True, type=click.IntRange(min=1),
              help="Bootstrap resamples of the Val clips (with --ci).")
@click.option("--vary", "vary", multiple=True, metavar="FIELD=V1,V2,...",
              help="One more grid axis (repeatable; the grid is the product of all): lr, weight_decay, batch_size, "
                   "grad_clip, patience, lr_factor, epochs, hidden, dropout, input_layer, chain_order (orders as "
                   "a+b+c, or 'all': every permutation of the tasks), n_heads, branch_blocks, or a weighting's "
                   "option as WEIGHTING_OPTION (dwa_temperature, rruw_phi, druw_beta, ...). Each applies only to "
                   "the runs it changes (chain_order to CHAIN, druw_beta to DRUW, ...).")
@_fold_options
@_head_options
def ablate_command(cache_path: Path, out: Path, archs: str, weightings: str, seeds: str, max_group_mib: int,
                   ci: float, n_boot: int, vary: tuple[str, ...], folds: int, fold: int | None, fold_seed: int,
                   hidden: int, dropout: float, input_layer: str, chain_order: str, n_heads: int, branch_blocks: int,
                   branch_frames: bool, epochs: int, batch_size: int, lr: float, weight_decay: float, grad_clip: float,
                   patience: int, lr_factor: float, device: str, precision: str, progress: bool, report_to: str,
                   tracking_dir: Path | None) -> None:
    """Train every arch x weighting x seed (runs of one arch jointly), resumably; print a Table I-style summary.

    `accelerate launch --num_processes N -m heads.ablate` (same options) spreads the joint groups over N
    processes, each on its own GPU (or sharing the CPU cores); process 0 writes and prints the tables."""
    _check_fold_options(folds, fold, one_round=False)
    arch_list, seed_list = _csv_list(archs, "architecture", ARCHS), _seed_list(seeds)
    weighting_list = _csv_list(weightings, "weighting", WEIGHTINGS)
    head = _head_config(hidden, dropout, input_layer, chain_order, n_heads, branch_blocks, branch_frames)
    with command_errors(), _tracking(report_to, tracking_dir, out, lambda run: out / run / CONFIG_FILE) as tracker:
        # the grid folder's lock is taken inside run_grid, once the processes of a launch know each other
        from heads.analysis.bootstrap import BootstrapConfig  # noqa: PLC0415
        from heads.training.axes import parse_vary  # noqa: PLC0415
        from heads.training.device import resolve_device  # noqa: PLC0415
        from heads.training.grid import GridConfig, run_grid  # noqa: PLC0415
        from heads.training.joint import TrainConfig  # noqa: PLC0415

        train_device = resolve_device(device)   # the one resolution; a missing device fails before anything loads
        grid = GridConfig(
            cache=str(cache_path), archs=tuple(arch_list), weightings=tuple(weighting_list), seeds=tuple(seed_list),
            run=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            grad_clip=grad_clip, patience=patience, lr_factor=lr_factor, head=head,
                            precision=precision),
            max_group_bytes=None if max_group_mib is None else max_group_mib * 2**20,
            folds=folds, fold=fold, fold_seed=fold_seed, vary=parse_vary(vary))
        rows = run_grid(grid, out, device=train_device, progress=progress, tracker=tracker,
                        bootstrap=BootstrapConfig(level=ci, n_boot=n_boot) if ci else None)
    if not rows:   # another process of a multi-process grid: process 0 prints the tables
        return
    if folds:
        from heads.training.crossval import CROSSVAL_MD, fold_dir  # noqa: PLC0415

        summary = out / CROSSVAL_MD
        tables = summary if summary.is_file() else fold_dir(out, rows[-1]["fold"]) / RESULTS_MD
        click.echo(tables.read_text(encoding="utf-8"), nl=False)
        click.echo(f"wrote {len({r['fold'] for r in rows})} round(s) under {out}"
                   + (f" and {summary}" if summary.is_file() else ""))
        return
    click.echo((out / RESULTS_MD).read_text(encoding="utf-8"), nl=False)
    click.echo(f"wrote {out / RESULTS_CSV}, {out / RESULTS_JSON} and {out / RESULTS_MD}")


@heads_group.command("search")
@click.option("--cache", "cache_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HDF5 feature cache written by `avb dump`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Search folder: study.db (the Optuna study), trials.csv, one run folder per finished trial.")
@click.option("--space", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML: each field with {low, high[, log]} or a list (arch, weighting, seed, and every --vary "
                   "field; chain_order: all).")
@click.option("--trials", required=True, type=click.IntRange(min=1), help="Finished trials to reach.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Trials asked at once; those of one shape train as one stacked model.")
@click.option("--sampler", type=click.Choice(("tpe", "random")), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(("median", "hyperband", "none")), default="median", show_default=True)
@click.option("--seed", "study_seed", default=0, show_default=True, type=int,
              help="Seed of the sampler: the same seed gives the same study.")
@click.option("--arch", type=click.Choice(ARCHS, case_sensitive=False), default=ConfigDefault(TRAIN + "arch"),
              show_default=True, help="The architecture of every trial (unless the space lists arch).")
@click.option("--weighting", type=click.Choice(WEIGHTINGS, case_sensitive=False),
              default=ConfigDefault(TRAIN + "weighting"), show_default=True,
              help="The loss weighting of every trial (unless the space lists weighting).")
@_head_options
def search_command(cache_path: Path, out: Path, space: Path, trials: int, batch: int, sampler: str, pruner: str,
                   study_seed: int, arch: str, weighting: str, hidden: int, dropout: float, input_layer: str,
                   chain_order: str, n_heads: int, branch_blocks: int, branch_frames: bool, epochs: int,
                   batch_size: int, lr: float, weight_decay: float, grad_clip: float, patience: int,
                   lr_factor: float, device: str, precision: str, progress: bool, report_to: str,
                   tracking_dir: Path | None) -> None:
    """Search the space with Optuna, trials asked in batches and trained as stacked runs; resumable (SQLite).

    The options a trial does not draw from the space are fixed for all (the same as `avb heads train`'s).
    `accelerate launch --num_processes N -m heads.search` (same options) makes N workers on the one study, each
    on its own GPU (or sharing the CPU cores); process 0 prints the best trial."""
    head = _head_config(hidden, dropout, input_layer, chain_order, n_heads, branch_blocks, branch_frames)
    with command_errors():   # the search folder's lock is taken inside run_search, once a launch's processes meet
        from cache.reader import load_cache  # noqa: PLC0415
        from heads.tasks import tasks_of  # noqa: PLC0415
        from heads.training.device import resolve_device  # noqa: PLC0415
        from heads.training.joint import TrainConfig  # noqa: PLC0415
        from heads.training.search import (  # noqa: PLC0415
            SearchSettings,
            read_space,
            run_search,
            train_command_of,
            trial_dir,
        )

        if report_to != "none":
            raise click.BadParameter("trials are followed in trials.csv and study.db", param_hint="--report-to")
        del tracking_dir
        train_device = resolve_device(device)
        cache = load_cache(cache_path)
        dims = read_space(space, tasks_of(cache.attrs, str(cache_path)))
        fixed = TrainConfig(arch=arch, weighting=weighting, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, grad_clip=grad_clip, patience=patience, lr_factor=lr_factor,
                            head=head, precision=precision)
        study = run_search(cache, out, dims, fixed, SearchSettings(trials, batch, sampler, pruner, study_seed),
                           device=train_device, progress=progress, say=click.echo)
    if study is None:   # another process of a launch: process 0 prints the best trial
        return
    best = study.best_trial
    from heads.runs import read_run_config  # noqa: PLC0415
    from heads.training.joint import TrainConfig  # noqa: PLC0415

    config = read_run_config(trial_dir(out, best.number))
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("run_format", "cache", "cache_attrs")})
    click.echo(f"best: trial {best.number} (Val mean {best.value:.4f}) in {trial_dir(out, best.number)}; "
               f"{', '.join(f'{k}={v}' for k, v in best.params.items())}")
    click.echo("reproduce it alone with:")
    click.echo("  " + train_command_of(cache_path, cfg, out / "best"))
