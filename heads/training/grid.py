"""The ablation grid: every architecture x loss weighting x seed, resumable, summarised like the paper's Table I.

The runs of one architecture train jointly in `train_runs` calls (one stacked head each), so the grid costs
about one run per joint group rather than one per cell. A joint call holds every run's parameters, gradients,
both AdamW moments and a best-epoch copy at once, so the runs are split into joint groups that fit
`max_group_bytes` (`joint_groups`): with the default budget VANILLA and CHAIN (~15 MiB of state per run) train
12 runs in one group, while BRANCH (~132 MiB per run at wav2vec2-base size) trains 12 runs as 3 groups of 4,
which keeps the HUME-scale grid's peak memory under twice the in-memory cache. A run folder whose `metrics.json`
exists (written last) and whose `config.json` equals the config it would get now is finished and is not trained
again, so an interrupted grid resumes where it stopped and a grown grid (more seeds) trains only the new runs. A joint
call that was killed while writing its run folders is retrained as a whole (see `_interrupted_groups`), so
a resumed grid is bit-identical to an uninterrupted one. The groups are cut from the grid's run list (not
from the unfinished runs), so the same grid always gives the same groups and a resumed grid trains every run
in the same stack as an uninterrupted one.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cache.command_kit.atomic import write_json_atomic
from cache.command_kit.errors import AvbError
from cache.command_kit.jsonable import jsonable
from cache.command_kit.lock import hold_output
from heads.analysis.bootstrap import BootstrapConfig
from heads.analysis.tables import write_tables
from heads.model.architectures import HeadConfig, build_head, with_chain_order
from heads.names import (
    ARCHS,
    DEFAULT_MAX_GROUP_BYTES,
    PAPER_WEIGHTINGS,
    WEIGHTINGS,
)
from heads.runs import CONFIG_FILE, RunDirError, is_complete, read_run
from heads.tasks import TaskSet, tasks_of
from heads.training import axes, crossval
from heads.training.device import resolve_device
from heads.training.distributed import assign_groups, grid_processes
from heads.training.folds import round_view
from heads.training.joint import (
    SELECTION_KEY,
    TrainConfig,
    run_config_record,
    shape_key,
    train_runs,
)

# TrainConfig fields that the grid sets per run (the rest of its `run` template is shared by every run).
PER_RUN_FIELDS: tuple[str, ...] = ("arch", "weighting", "seed", "weighting_options", "variant")
# Beside the run folders while a joint `train_runs` call runs: the names of its runs (one file per call, named
# after its first run, so the calls of several processes never share one).
GROUP_MARKER = ".training-{first}.json"
# float32 arrays a joint call holds per parameter and run: the parameter, its gradient, AdamW's two moments,
# and the best epoch's copy.
STATE_ARRAYS = 5
# Default budget of one joint call's training state. Fits 12 VANILLA/CHAIN runs at the paper's head size
# (12 x 15.5 MiB) and 4 BRANCH runs (4 x 132 MiB): the HUME-scale BRANCH grid of 12 runs trains as 3 groups of 4.
# On a GPU the state of a joint call lives in device memory: a quarter of it by default (12 BRANCH runs need
# ~1.6 GB), so a grid's joint groups are as large as the grid allows.
GPU_GROUP_FRACTION = 0.25


def default_group_bytes(device: torch.device) -> int:
    """The joint-call budget when none is given: DEFAULT_MAX_GROUP_BYTES of host RAM, or a quarter of a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_GROUP_FRACTION)
    return DEFAULT_MAX_GROUP_BYTES


class AblationError(AvbError):
    """A bad grid specification or an output folder that cannot be used."""


@dataclass
class GridConfig:
    """The grid: which runs (architectures x loss weightings x seeds) and the settings they share.

    `run` is every run's TrainConfig (defaults = the paper's settings); its arch, weighting, seed and weighting
    options are set per run. Built once by the command line (or a caller) and passed whole.
    """

    cache: str = ""
    archs: tuple[str, ...] = ARCHS
    weightings: tuple[str, ...] = PAPER_WEIGHTINGS
    seeds: tuple[int, ...] = (0,)
    run: TrainConfig = field(default_factory=TrainConfig)
    weighting_options: dict[str, dict] = field(default_factory=dict)   # weighting name -> its options
    max_group_bytes: int | None = None   # training-state budget of one joint call; None: the device's; 0: no limit
    folds: int = 0                       # > 0: speaker-independent cross-validation (heads.training.crossval)
    fold: int | None = None              #   only this round (None: every round)
    fold_seed: int = 0                   #   seed of the fold assignment (avb finetune --folds uses the same)
    vary: dict[str, tuple] = field(default_factory=dict)   # more axes: field -> values (heads.training.axes)

    def __post_init__(self) -> None:
        self.cache = str(Path(self.cache).resolve()) if self.cache else ""
        self.archs = _unique("architecture", [str(a).lower() for a in self.archs], ARCHS)
        self.weightings = _unique("weighting", [str(w).lower() for w in self.weightings], WEIGHTINGS)
        self.seeds = _unique("seed", [int(s) for s in self.seeds])
        self.weighting_options = {k.lower(): dict(v) for k, v in self.weighting_options.items()}
        unknown = sorted(set(self.weighting_options) - set(WEIGHTINGS))
        if unknown:
            raise AblationError(f"options given for unknown weighting(s) {', '.join(unknown)}")
        unknown = [name for name in self.vary if name not in axes.valid_names()]
        if unknown:
            raise AblationError(f"vary names unknown field {unknown[0]!r}; expected one of "
                                f"{', '.join(axes.valid_names())}")
        self.vary = {name: tuple(values) for name, values in self.vary.items()}
        if self.max_group_bytes is not None and self.max_group_bytes < 0:
            raise AblationError(f"max_group_bytes must be >= 0 (0: no limit), got {self.max_group_bytes}")

    def to_dict(self) -> dict[str, Any]:
        """JSON types; the per-run fields of the `run` template are left out (each run sets its own)."""
        data = jsonable(asdict(self))
        for key in PER_RUN_FIELDS:
            data["run"].pop(key, None)
        if not self.folds:   # a plain grid's record stays as it was before cross-validation existed
            for key in ("folds", "fold", "fold_seed"):
                data.pop(key)
        if not self.vary:    # ... and before axes existed
            data.pop("vary")
        data["run"]["head"].pop("arch", None)
        return data

    def run_configs(self, arch: str) -> list[TrainConfig]:
        """The runs of one architecture, in grid order (weighting-major, then the axes' combinations, then seed)."""
        out = []
        for w in self.weightings:
            base = replace(self.run, arch=arch, weighting=w, head=replace(self.run.head, arch=arch),
                           weighting_options=dict(self.weighting_options.get(w, {})))
            for values in axes.variants(self.vary, arch, w):
                if values.get("chain_order") == axes.ALL_ORDERS:
                    raise AblationError("chain_order=all is resolved against the cache's tasks (run_grid does it)")
                varied = axes.apply(base, values) if values else base
                out += [replace(varied, seed=s) for s in self.seeds]
        return out

    @property
    def varied(self) -> list[str]:
        """The names of the extra axes, in the order given (a column each in the result tables)."""
        return list(self.vary)


def _unique(kind: str, values: Sequence[Any], valid: Sequence[Any] | None = None) -> tuple[Any, ...]:
    out = tuple(values)
    if not out:
        raise AblationError(f"the grid needs at least one {kind}")
    if len(set(out)) != len(out):
        raise AblationError(f"{kind}s listed twice: {', '.join(map(str, out))}")
    if valid is not None:
        for v in out:
            if v not in valid:
                raise AblationError(f"unknown {kind} {v!r}; expected one of {', '.join(valid)}")
    return out


def _is_finished(run_dir: Path, record: dict[str, Any]) -> bool:
    """metrics.json present (written last) and the stored config equal to the one the run would get now."""
    if not is_complete(run_dir):
        return False
    try:
        stored = read_run(run_dir).config
    except RunDirError:   # unreadable, from another run-folder format, or not a head run: train it again
        return False
    return stored == jsonable(record)


def run_state_bytes(head: HeadConfig, layer_dims: dict[str, int], tasks: TaskSet) -> int:
    """Bytes one run adds to a joint call: its parameter count x STATE_ARRAYS float32 arrays.

    Counted on a one-run head (built, so the count is exactly what `train_runs` will stack); activations and
    the loss weightings' few parameters are left out: the stacked state dominates at the paper's sizes.
    """
    model = build_head(head, dict(layer_dims), [0], tasks)
    return STATE_ARRAYS * 4 * sum(p.numel() for p in model.parameters())


def joint_groups(n_runs: int, per_run_bytes: int, max_group_bytes: int) -> list[list[int]]:
    """Split run indices 0..n_runs-1 into contiguous joint groups of at most `max_group_bytes` of state each.

    As few groups as the budget allows (each call costs its per-step overhead), of sizes as equal as possible,
    larger ones first: 12 runs with room for 5 give 4+4+4, the same three calls as 5+5+2 at a lower peak. A run
    bigger than the budget trains alone. `max_group_bytes` <= 0 means no limit (one group).
    """
    if n_runs <= 0:
        return []
    if max_group_bytes <= 0:
        return [list(range(n_runs))]
    per_group = max(1, int(max_group_bytes) // max(1, int(per_run_bytes)))
    n_groups = -(-n_runs // per_group)
    base, extra = divmod(n_runs, n_groups)
    groups, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def _interrupted_groups(out: Path, arch: str, finished: set[str]) -> list[list[str]]:
    """The run names of every joint call of `arch` that was interrupted before it wrote all its runs.

    A run trained in a stack of R runs equals the same run trained in a stack of R' runs only up to float
    rounding (the stacked kernels may sum in another order), and `train_runs` writes its run folders one after
    the other. A kill between two of those writes would leave some runs from the R-run call and retrain the rest
    in a smaller one; retraining the whole interrupted group instead keeps a resumed grid bit-identical to an
    uninterrupted one. A marker (the names of the runs in the call) exists only while its call is running; one
    whose runs are all finished was killed after its last write and is removed.
    """
    groups = []
    for marker in sorted(out.glob(GROUP_MARKER.format(first=f"{arch}-*"))):
        try:
            names = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(names, list):
            continue
        names = [n for n in names if isinstance(n, str)]
        if set(names) <= finished:
            marker.unlink(missing_ok=True)
        else:
            groups.append(names)
    return groups


def _run_dirs(grid: GridConfig, out: Path) -> list[Path]:
    """Every run's folder, in grid order (the order of `_run_locked`'s rows)."""
    return [out / cfg.name for arch in grid.archs for cfg in grid.run_configs(arch)]


def _row(tasks: TaskSet, cfg: TrainConfig, metrics: dict[str, Any], varied: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": cfg.arch, "weighting": cfg.weighting, "seed": cfg.seed}
    for name in varied:   # '' where the axis does not apply to this run (e.g. chain_order for VANILLA)
        row[name] = axes.value_text(axes.axis_value(cfg, name)) if axes.applies(name, cfg.arch, cfg.weighting) \
            else ""
    for key in (*tasks.metric_keys, SELECTION_KEY):
        row[key] = float(metrics[key])
    row["best_epoch"] = int(metrics["best_epoch"])
    return row


def run_grid(grid: GridConfig, out_dir: str | Path, *, device: torch.device | None = None,
             bootstrap: BootstrapConfig | None = BootstrapConfig(), progress: bool = True,
             tracker: Any = None) -> list[dict]:
    """Train (or reuse) every run of `grid` under `out_dir` and write the result tables.

    The runs of one architecture train jointly in groups whose training state (`run_state_bytes` per run)
    fits `grid.max_group_bytes` (0: one group per architecture; None: `default_group_bytes` of the device).
    `device` is where the runs train, as resolved by the caller (`resolve_device`; None: auto). Returns one row
    per run (`heads.analysis.tables.RESULT_FIELDS`), in grid order, and writes `config.json` (the resolved
    grid) and the tables (`heads.analysis.tables.write_tables`) into `out_dir`; with `bootstrap` they carry
    intervals and paired comparisons. Under `accelerate launch --num_processes N` every process trains its
    share of the joint groups on its own device (`heads.training.distributed`); rank 0 writes the tables once
    all have finished, the others return []. `tracker` is handed to `train_runs`.
    """
    from cache.reader import load_cache  # noqa: PLC0415 - h5py only when a grid actually runs

    if not grid.cache:
        raise AblationError("the grid names no cache")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AblationError(f"{out}: exists and is not a directory")
    procs = grid_processes()
    train_device = procs.device(resolve_device("auto") if device is None else device)
    if grid.max_group_bytes is None:
        grid = replace(grid, max_group_bytes=default_group_bytes(train_device))
    # One grid per folder: a second command on it stops at once (cache.command_kit.lock); the processes of one
    # launch share the lock of rank 0, which leaves last (it writes the tables after every rank has finished).
    with hold_output(out, ranks=procs):
        cache = load_cache(grid.cache)
        tasks = tasks_of(cache.attrs, grid.cache)
        grid = replace(grid, run=replace(grid.run, head=with_chain_order(grid.run.head, tasks)),
                       vary=axes.resolve(grid.vary, tasks))
        if grid.folds:
            return _run_rounds(grid, cache, out, procs, train_device, progress, tracker, bootstrap)
        rows = _run_locked(grid, cache, out, procs, train_device, progress, tracker)
        if procs.is_main:
            write_tables(out, rows, _run_dirs(grid, out), grid.to_dict(), cache, bootstrap, grid.varied)
    return rows if procs.is_main else []


def _run_rounds(grid: GridConfig, cache: Any, out: Path, procs: Any, device: torch.device, progress: bool,
                tracker: Any, bootstrap: BootstrapConfig | None) -> list[dict]:
    """Cross-validation: the grid once per round on that round's view of the cache, into OUT/fold-k; the
    summary tables once every round is complete (heads.training.crossval)."""
    folds, rounds = crossval.plan(cache, grid.folds, grid.fold, grid.fold_seed)
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        crossval.write_folds(out, cache, folds)
        write_json_atomic(out / CONFIG_FILE, grid.to_dict())
    rows: list[dict] = []
    for k in rounds:
        view = round_view(cache, folds, k, grid.folds, grid.fold_seed)
        fold_out = crossval.fold_dir(out, k)
        fold_rows = _run_locked(grid, view, fold_out, procs, device, progress, tracker)
        if procs.is_main:
            write_tables(fold_out, fold_rows, _run_dirs(grid, fold_out), grid.to_dict(), view, bootstrap,
                         grid.varied)
            rows += [{**r, "fold": k} for r in fold_rows]
    names = [cfg.name for arch in grid.archs for cfg in grid.run_configs(arch)]
    done = all(is_complete(crossval.fold_dir(out, k) / name) for k in range(grid.folds) for name in names)
    if procs.is_main and done:
        crossval.write_summary(out, cache, folds, grid.folds, names, bootstrap)
    return rows if procs.is_main else []


def _run_locked(grid: GridConfig, cache: Any, out: Path, procs: Any, device: torch.device, progress: bool,
                tracker: Any) -> list[dict]:
    """Every process trains its joint groups; rank 0 returns the rows of all runs once all have finished."""
    from cache.reader import FrameReader  # noqa: PLC0415 - h5py only when a grid actually runs

    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CONFIG_FILE, grid.to_dict())
    frames = FrameReader(cache.path) if grid.run.head.branch_use_frames and "branch" in grid.archs else None
    try:
        groups = _plan_groups(grid, cache, out)
        procs.barrier()   # every rank has read which runs are finished before any rank writes
        mine = assign_groups([g.cost for g in groups], procs.world)[procs.rank]
        _train_groups([groups[i] for i in mine], cache, out, frames, device,
                      progress and procs.is_main, procs.provenance(), tracker)
        procs.barrier()
    finally:
        if frames is not None:
            frames.close()
    if not procs.is_main:
        return []
    tasks = tasks_of(cache.attrs, str(cache.path))
    return [_row(tasks, cfg, read_run(out / cfg.name).metrics, grid.varied)
            for arch in grid.archs for cfg in grid.run_configs(arch)]


@dataclass
class JointGroup:
    """One joint `train_runs` call of the grid: its runs (all unfinished ones of the group) and a cost estimate."""

    arch: str
    configs: list[TrainConfig]
    dirs: list[Path]
    cost: float      # parameters x runs: what a step moves through memory, the split's weight across ranks


def _plan_groups(grid: GridConfig, cache: Any, out: Path) -> list[JointGroup]:
    """The joint groups that still have work, in grid order.

    Groups are cut from the grid's whole run list (not from the unfinished runs), so the same grid always gives
    the same groups and a resumed grid trains every run in the same stack as an uninterrupted one; a group
    interrupted mid-call is retrained whole (`_interrupted_groups`).
    """
    planned = []
    for arch in grid.archs:
        configs = grid.run_configs(arch)
        dirs = [out / cfg.name for cfg in configs]
        records = [run_config_record(cfg, cache) for cfg in configs]
        todo = {i for i, (d, rec) in enumerate(zip(dirs, records)) if not _is_finished(d, rec)}
        index = {cfg.name: i for i, cfg in enumerate(configs)}
        finished = {cfg.name for i, cfg in enumerate(configs) if i not in todo}
        for names in _interrupted_groups(out, arch, finished):
            todo |= {index[n] for n in names if n in index}
        shapes: dict[tuple, list[int]] = {}   # runs that can stack (heads.training.joint.shape_key), in order
        for i, cfg in enumerate(configs):
            shapes.setdefault(shape_key(cfg), []).append(i)
        for stack in shapes.values():
            per_run = run_state_bytes(configs[stack[0]].head, dict(cache.layer_dims),
                                      tasks_of(cache.attrs, str(cache.path)))
            for group in joint_groups(len(stack), per_run, grid.max_group_bytes):
                members = [stack[i] for i in group if stack[i] in todo]
                if members:
                    planned.append(JointGroup(arch, [configs[i] for i in members], [dirs[i] for i in members],
                                              float(per_run * len(members))))
    return planned


def _train_groups(groups: Sequence[JointGroup], cache: Any, out: Path, frames: Any, device: torch.device,
                  progress: bool, provenance: dict, tracker: Any = None) -> None:
    """One joint `train_runs` call per group, each announced by its marker while it runs."""
    bar = tqdm(total=sum(len(g.configs) for g in groups), desc="ablation", unit="run", disable=not progress)
    for group in groups:
        bar.set_postfix(arch=group.arch, training=len(group.configs))
        marker = out / GROUP_MARKER.format(first=group.configs[0].name)
        write_json_atomic(marker, [cfg.name for cfg in group.configs])
        train_runs(cache, group.configs, group.dirs, device=device, progress=progress,
                   frames=frames if group.arch == "branch" else None, provenance=provenance, tracker=tracker)
        marker.unlink(missing_ok=True)
        bar.update(len(group.configs))
    bar.close()
