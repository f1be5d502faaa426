"""`avb heads search`: Optuna over the head's settings, trials asked in batches and trained as stacked runs.

A batch of B trials is asked at once (`study.ask`), its configurations are grouped by the shapes they give the
stacked model (`heads.training.joint.shape_key`: lr, dropout and weighting options stack, hidden or chain order
do not), and each group trains as one joint `train_runs` call, so B trials cost about one run each group. A
trial reports its Val mean after every epoch; a trial the pruner stops leaves the stack there
(`JointTraining.keep_runs`: the others go on exactly as they would have, at the cost of the runs left), is
told PRUNED and its folder removed; a group whose trials are all pruned ends.

The study lives in `DIR/study.db` (SQLite), so the same command resumes a killed search: the trials the kill
left RUNNING are failed and enqueued again with the same parameters. Every finished trial is an ordinary run
folder `DIR/trial-NNNN` (ensemble, predict and report take it); `DIR/trials.csv` lists every trial.

Under `accelerate launch --num_processes N -m heads.search` every process is one more Optuna worker on the same
study, on its own device: a process asks its batch while holding `DIR/.ask-lock`, so the processes together
ask exactly the trials still missing (and all ask their first batch before any trains), and each samples with seed + its rank (the same seed then gives the same
study only for one process, as the order in which processes ask varies).

The space file (YAML) maps each field to a range or a list:

    lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    dropout: {low: 0.0, high: 0.5}
    hidden: [64, 128, 256]
    weighting: [uniform, dwa, rruw, druw]
    chain_order: all
    druw_beta: {low: 0.0, high: 2.0}

Fields: `arch`, `weighting`, `seed` and every `--vary` axis (heads.training.axes); a field is suggested only for
the trials it applies to (druw_beta for DRUW trials, chain_order for CHAIN trials).
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cache.command_kit.atomic import write_text_atomic
from cache.command_kit.errors import AvbError
from cache.command_kit.lock import hold_output
from heads.model.architectures import with_chain_order
from heads.names import ARCHS, WEIGHTINGS
from heads.runs import STUDY_FILE, STUDY_NAME, TRIALS_CSV
from heads.tasks import SELECTION_KEY, TaskSet, tasks_of
from heads.training import axes
from heads.training.distributed import GridProcesses, grid_processes
from heads.training.joint import TrainConfig, shape_key, train_runs

SAMPLERS, PRUNERS = ("tpe", "random"), ("median", "hyperband", "none")
ASK_LOCK = ".ask-lock"      # processes of one launch ask their batches one at a time
SQLITE_WAIT_S = 120         # how long a process waits on another's write to study.db before failing
CHOICE_FIELDS: dict[str, tuple[Any, ...]] = {"arch": ARCHS, "weighting": WEIGHTINGS}


class SearchError(AvbError):
    """A space file or search setting that cannot work, or Optuna missing; one line."""


@dataclass(frozen=True)
class Dimension:
    """One field of the space: a float or int range (optionally log-scaled) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    integer: bool = False


def _optuna() -> Any:
    try:
        import optuna  # noqa: PLC0415
    except ImportError:
        raise SearchError("avb heads search needs Optuna: pip install 'avb-heads[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def read_space(path: str | Path, tasks: TaskSet) -> list[Dimension]:
    """The dimensions of a space file, checked (one-line errors naming the file and field)."""
    from yaml import YAMLError, safe_load  # noqa: PLC0415

    path = Path(path)
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SearchError(f"{path}: cannot read the space file ({err.strerror or err})") from None
    except YAMLError as err:
        raise SearchError(f"{path}: malformed YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or not data:
        raise SearchError(f"{path}: a space file maps fields to ranges or lists, e.g. 'lr: {{low: 1e-4, high: 3e-3}}'")
    dims = []
    for name, spec in data.items():
        name = str(name).lower()
        where = f"{path}, field {name}"
        if name in CHOICE_FIELDS or name == "seed":
            choices = spec if isinstance(spec, list) else None
            if not choices:
                raise SearchError(f"{where}: expected a list of values")
            if name in CHOICE_FIELDS:
                bad = [c for c in choices if str(c).lower() not in CHOICE_FIELDS[name]]
                if bad:
                    raise SearchError(f"{where}: unknown value {bad[0]!r}; expected some of "
                                      f"{', '.join(CHOICE_FIELDS[name])}")
                choices = [str(c).lower() for c in choices]
            dims.append(Dimension(name, choices=tuple(choices)))
            continue
        if name not in axes.valid_names():
            raise SearchError(f"{where}: unknown field; expected arch, weighting, seed or one of "
                              f"{', '.join(axes.valid_names())}")
        if name == "chain_order":
            orders = list(itertools.permutations(tasks.names)) if spec == axes.ALL_ORDERS else None
            if orders is None:
                if not isinstance(spec, list):
                    raise SearchError(f"{where}: expected 'all' or a list of orders such as a+b+c")
                try:
                    orders = [tasks.parse_order(str(o).split("+")) for o in spec]
                except AvbError as err:
                    raise SearchError(f"{where}: {err}") from None
            dims.append(Dimension(name, choices=tuple("+".join(o) for o in orders)))
            continue
        integer = isinstance(_default(name), int) and not isinstance(_default(name), bool)
        if isinstance(spec, list):
            try:
                values = axes.parse_vary([f"{name}={','.join(map(str, spec))}"])[name]
            except AvbError as err:
                raise SearchError(f"{where}: {err}") from None
            dims.append(Dimension(name, choices=values))
        elif isinstance(spec, dict) and set(spec) <= {"low", "high", "log"} and {"low", "high"} <= set(spec):
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                raise SearchError(f"{where}: expected low < high, two numbers, got {low!r} and {high!r}")
            if spec.get("log") and low <= 0:
                raise SearchError(f"{where}: a log range needs low > 0, got {low!r}")
            dims.append(Dimension(name, float(low), float(high), bool(spec.get("log")), integer=integer))
        else:
            raise SearchError(f"{where}: expected {{low: L, high: H[, log: true]}} or a list of values")
    return dims


def _default(name: str) -> Any:
    from heads.model.architectures import HeadConfig  # noqa: PLC0415

    for cls in (TrainConfig, HeadConfig):
        if name in cls.__dataclass_fields__:
            return cls.__dataclass_fields__[name].default
    return 0.0   # a weighting option: a number


def suggest(trial: Any, dims: list[Dimension], fixed: TrainConfig, tasks: TaskSet) -> TrainConfig:
    """The trial's TrainConfig: `fixed` with the suggested values of the dimensions that apply to it."""
    by_name = {d.name: d for d in dims}
    arch = trial.suggest_categorical("arch", list(by_name["arch"].choices)) if "arch" in by_name else fixed.arch
    weighting = (trial.suggest_categorical("weighting", list(by_name["weighting"].choices))
                 if "weighting" in by_name else fixed.weighting)
    seed = trial.suggest_categorical("seed", list(by_name["seed"].choices)) if "seed" in by_name else fixed.seed
    values: dict[str, Any] = {}
    for dim in dims:
        if dim.name in ("arch", "weighting", "seed") or not axes.applies(dim.name, arch, weighting):
            continue
        if dim.choices:
            value = trial.suggest_categorical(dim.name, list(dim.choices))
            values[dim.name] = tuple(value.split("+")) if dim.name == "chain_order" else value
        elif dim.integer:
            values[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
        else:
            values[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
    cfg = replace(fixed, arch=arch, weighting=weighting, seed=int(seed), head=replace(fixed.head, arch=arch))
    cfg = replace(axes.apply(cfg, values), variant=f"-trial{trial.number}")
    cfg = replace(cfg, head=with_chain_order(cfg.head, tasks))
    cfg.head.validate(tasks)   # a combination that cannot build (BRANCH's hidden % n_heads) fails here, alone
    return cfg


def trial_dir(out: Path, number: int) -> Path:
    return Path(out) / f"trial-{number:04d}"


@dataclass
class SearchSettings:
    trials: int
    batch: int = 8
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0


def _study(optuna: Any, out: Path, settings: SearchSettings, rank: int = 0) -> Any:
    seed = settings.seed + rank   # processes of a launch must not draw the same random trials
    sampler = (optuna.samplers.TPESampler(seed=seed) if settings.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    pruner = {"median": optuna.pruners.MedianPruner(n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(), "none": optuna.pruners.NopPruner()}[settings.pruner]
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(out).resolve() / STUDY_FILE}",
                                         engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT_S}})
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="maximize",
                               sampler=sampler, pruner=pruner)


@contextlib.contextmanager
def _asking(out: Path) -> Iterator[None]:
    """One process of a launch at a time counts the trials and asks its batch."""
    with open(Path(out) / ASK_LOCK, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _recover(study: Any, optuna: Any, out: Path) -> None:
    """The trials a kill left RUNNING: failed, their half-written folders removed, asked again with the same
    parameters. Only before any process of this launch has asked, so every RUNNING trial is a dead one."""
    state = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        study.tell(stale.number, state=state.FAIL)
        study.enqueue_trial(stale.params)
        shutil.rmtree(trial_dir(out, stale.number), ignore_errors=True)


def run_search(cache: Any, out: Path, dims: list[Dimension], fixed: TrainConfig, settings: SearchSettings, *,
               device: Any, progress: bool = True, say: Callable[[str], None] = print) -> Any:
    """Run (or resume) the study until `settings.trials` trials are finished; returns the Optuna study (None on
    the other processes of a launch, which share process 0's).

    The search folder's lock is taken here, once the processes of a launch know each other."""
    optuna = _optuna()
    if settings.trials < 1 or settings.batch < 1:
        raise SearchError(f"--trials and --batch must be >= 1, got {settings.trials} and {settings.batch}")
    tasks = tasks_of(cache.attrs, str(cache.path))
    procs = grid_processes()
    device = procs.device(device)
    out = Path(out)
    with hold_output(out, ranks=procs):
        if procs.is_main:
            out.mkdir(parents=True, exist_ok=True)
            study = _study(optuna, out, settings)
            _recover(study, optuna, out)
        procs.barrier()   # the study exists and holds no stale trial before any process asks
        if not procs.is_main:
            study = _study(optuna, out, settings, procs.rank)
        if procs.world > 1:
            say = _prefixed(say, f"process {procs.rank}: ")
        worker = _Worker(study, optuna.trial.TrialState, cache, out, dims, fixed, settings, tasks, procs, device,
                         progress and procs.is_main, say)
        asked = worker.ask()
        procs.barrier()   # every process holds its first batch before any trains: the work is spread from the start
        while asked:
            worker.train(asked)
            if procs.is_main:
                write_trials_csv(out, study)
            asked = worker.ask()
        procs.barrier()   # every process's trials are told before the final table
        if not procs.is_main:
            return None
        write_trials_csv(out, study)
    return study


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: say(prefix + line)


@dataclass
class _Worker:
    """This process's part of a search: the shared study, the space and the fixed settings of its trials, and
    where they train."""

    study: Any
    state: Any   # optuna.trial.TrialState
    cache: Any
    out: Path
    dims: list[Dimension]
    fixed: TrainConfig
    settings: SearchSettings
    tasks: TaskSet
    procs: GridProcesses
    device: Any
    progress: bool
    say: Callable[[str], None]

    def ask(self) -> list[Any]:
        """This process's next batch of trials; none once the study has (or is training) all its trials."""
        state, study = self.state, self.study
        with _asking(self.out):   # counting other processes' RUNNING trials, together they ask what is missing
            counted = len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING)))
            return [study.ask() for _ in range(min(self.settings.batch, self.settings.trials - counted))]

    def train(self, asked: list[Any]) -> None:
        """Train and tell a batch: each group of one shape as one stack; a trial that cannot build fails alone."""
        state, study = self.state, self.study
        configs, refused = {}, []
        for t in asked:   # a combination the settings refuse (e.g. hidden not divisible by n_heads) fails alone
            try:
                configs[t.number] = suggest(t, self.dims, self.fixed, self.tasks)
            except AvbError as err:
                study.tell(t, state=state.FAIL)
                refused.append(f"trial {t.number}: {err}")
        if not configs:
            raise SearchError(f"every trial of a batch has settings that cannot train ({refused[0]})")
        for line in refused:
            self.say(f"failed {line}")
        stacks: dict[tuple, list[Any]] = {}
        for t in asked:
            if t.number in configs:
                stacks.setdefault(shape_key(configs[t.number]), []).append(t)
        for stack in stacks.values():
            self._train_stack(stack, configs)
        complete = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
        pruned = len(study.get_trials(deepcopy=False, states=(state.PRUNED,)))
        best = f"; best so far: {study.best_value:.4f} (trial {study.best_trial.number})" if complete else ""
        self.say(f"{complete + pruned} of {self.settings.trials} trials{f' ({pruned} pruned)' if pruned else ''}{best}")

    def _train_stack(self, stack: list[Any], configs: dict[int, TrainConfig]) -> None:
        """One stacked train_runs call; a trial the pruner stops leaves the stack (train_runs' `drop`)."""
        by_name = {configs[t.number].name: t for t in stack}
        pruned: set[int] = set()

        def report(name: str, epoch: int, entry: dict) -> None:   # called for the runs still in the stack
            trial = by_name[name]
            trial.report(float(entry["val"][SELECTION_KEY]), epoch)
            if trial.should_prune():
                pruned.add(trial.number)

        dirs = [trial_dir(self.out, t.number) for t in stack]
        results = train_runs(self.cache, [configs[t.number] for t in stack], dirs, device=self.device,
                             progress=self.progress, provenance=self.procs.provenance(), tracker=report,
                             drop=lambda epoch: {configs[n].name for n in pruned})
        for trial, run_dir, metrics in zip(stack, dirs, results):
            if metrics is None:
                self.study.tell(trial, state=self.state.PRUNED)
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                self.study.tell(trial, float(metrics[SELECTION_KEY]))


def write_trials_csv(out: Path, study: Any) -> Path:
    """number, state, value, run folder, then every parameter any trial had."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({p for t in trials for p in t.params})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "value", "run", *params])
    for t in trials:
        run = trial_dir(out, t.number)
        writer.writerow([t.number, t.state.name, "" if t.value is None else repr(float(t.value)),
                         run.name if (run / "metrics.json").is_file() else "",
                         *(t.params.get(p, "") for p in params)])
    path = Path(out) / TRIALS_CSV
    write_text_atomic(path, buf.getvalue())
    return path


def train_command_of(cache_path: str | Path, cfg: TrainConfig, out: str | Path) -> str:
    """The `avb heads train` command that trains `cfg` alone (the best trial, reproduced)."""
    head = cfg.head
    parts = ["avb heads train", f"--cache {cache_path}", f"--out {out}", f"--arch {cfg.arch}",
             f"--weighting {cfg.weighting}", f"--seed {cfg.seed}", f"--epochs {cfg.epochs}",
             f"--batch-size {cfg.batch_size}", f"--lr {cfg.lr!r}", f"--weight-decay {cfg.weight_decay!r}",
             f"--grad-clip {cfg.grad_clip!r}", f"--patience {cfg.patience}", f"--lr-factor {cfg.lr_factor!r}",
             f"--hidden {head.hidden}", f"--dropout {head.dropout!r}", f"--input-layer {head.input_layer}",
             f"--chain-order {','.join(head.chain_order)}", f"--n-heads {head.n_heads}",
             f"--branch-blocks {head.branch_blocks}"]
    parts += [f"--weighting-option {k}={v!r}" for k, v in sorted(cfg.weighting_options.items())]
    return " ".join(parts)
