"""`avb report`: PNG figures and one `index.html` that make a set of runs, ablations and ensembles readable.

Figures (each written only when its data exists):
- `curves.png`: the validation headline score per epoch of every run, one panel per task;
- `weights_<weighting>.png`: the per-epoch loss weights the weighting logged (DWA λ_k, RRUW 1/α_k², DRUW their
  sum), one panel per run and one line per task -- the figure that shows whether a weighting collapses;
- `ablation.png`: the arch × weighting grid per task (mean over seeds), as heatmaps annotated with the score;
- `ensemble_<name>.png`: every single run's Val score per task beside the ensemble's;
- `probe_<name>.png`: for a probe folder (`avb probe`), the layer x task heatmap of the linear probes' Val
  scores, coloured per task column (the tasks' metrics have different ranges) with the best layer marked.

The tasks are the runs' own (`heads.tasks.tasks_of` of the cache attributes each run recorded; A-VB's four for a
run that recorded none): K tasks give K panels (and the mean). Runs trained for different task lists get their
own curves, weights and ablation figures, suffixed with the corpus name. An ensemble's tasks are those of its
member runs, a probe's those recorded in its probe.json.

matplotlib is an optional extra (`plot`), imported only here and only when a report is made; figures are drawn
with the Agg canvas directly (no pyplot, so no global backend state and no display needed).
"""
from __future__ import annotations

import csv
import html
import io
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.atomic import write_bytes_atomic, write_text_atomic
from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from heads.metrics import score_text
from heads.runs import (
    ABLATION,
    CONFIG_FILE,
    ENSEMBLE,
    FINETUNE,
    MEMBERS_FILE,
    METRICS_FILE,
    PROBE_CSV,
    PROBE_JSON,
    PROBE_MD,
    RESULTS_CSV,
    RESULTS_JSON,
    RESULTS_MD,
    RUN,
    STUDY_FILE,
    STUDY_NAME,
    TRIALS_CSV,
    EnsembleFolder,
    RunFolder,
    find_runs,
    not_a_head_run,
    output_kind,
    read_ensemble,
    read_run,
    read_run_config,
)
from heads.tasks import AVB, SELECTION_KEY, TaskSet, tasks_of

# What each weighting logs as its per-task weight (the y-axis label of its figure).
WEIGHT_MEANING: dict[str, str] = {
    "uniform": "weight (constant 1)",
    "dwa": "DWA weight λ_k",
    "rruw": "RRUW weight 1/α_k²",
    "druw": "DRUW weight λ_k + 1/α_k²",
}
PLOT_EXTRA_HINT = "pip install 'avb-heads[plot]'"


class ReportError(AvbError):
    """Inputs a report cannot be made from; the message names the folder or file."""


# ----------------------------------------------------------------------------------------------- the inputs

@dataclass
class RunInfo(RunFolder):
    """A run folder as the report shows it: its label, arch, weighting and seed."""

    @property
    def arch(self) -> str:
        return str(self.config.get("arch", "?"))

    @property
    def weighting(self) -> str:
        return str(self.config.get("weighting", "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @cached_property
    def tasks(self) -> TaskSet:
        """The tasks the run was trained for (`run_tasks`)."""
        return run_tasks(self)

    @property
    def label(self) -> str:
        if "arch" in self.config and "weighting" in self.config:
            return f"{self.arch}-{self.weighting}" + (f"-s{self.seed}" if self.seed is not None else "")
        return self.path.name


@dataclass
class ProbeInfo:
    path: Path
    data: dict[str, Any]     # probe.json

    @property
    def tasks(self) -> TaskSet:
        """The cache's tasks as probe.json records them (A-VB for a probe.json from before task descriptions)."""
        return probe_tasks(self.data, self.path / PROBE_JSON)


@dataclass
class ReportInputs:
    runs: list[RunInfo] = field(default_factory=list)
    ensembles: list[EnsembleFolder] = field(default_factory=list)
    ablations: list[Path] = field(default_factory=list)
    probes: list[ProbeInfo] = field(default_factory=list)
    searches: list[Path] = field(default_factory=list)   # `avb heads search` folders (trials.csv, study.db)
    warnings: list[str] = field(default_factory=list)


def collect_inputs(dirs: Iterable[str | os.PathLike]) -> ReportInputs:
    """Classify each folder as a run, an ensemble, a probe (probe.json) or an ablation (runs inside); a run
    named twice (directly and through its ablation) is shown once."""
    from heads.analysis.probe import read_probe  # noqa: PLC0415

    found = ReportInputs()
    seen: set[Path] = set()
    for given in dirs:
        path = Path(given)
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory")
        kind = output_kind(path)
        if kind in (RUN, ABLATION):
            if (path / TRIALS_CSV).is_file():
                found.searches.append(path)
            elif kind == ABLATION:
                found.ablations.append(path)
            runs, warnings = find_runs([path])
            found.warnings += [w for w in warnings if w not in found.warnings]
            for run in runs:
                if run.resolve() not in seen:
                    seen.add(run.resolve())
                    folder = read_run(run)
                    found.runs.append(RunInfo(folder.path, folder.config, folder.metrics))
        elif (path / PROBE_JSON).is_file():
            found.probes.append(ProbeInfo(path, read_probe(path)))
        elif kind == FINETUNE:
            raise not_a_head_run(path)
        elif kind == ENSEMBLE:
            found.ensembles.append(read_ensemble(path))
        else:
            raise ReportError(f"{path}: not a run, ensemble, probe or ablation dir (no run dirs inside)")
    if not found.runs and not found.ensembles and not found.probes:
        raise ReportError("nothing to report: no complete runs, ensembles or probes")
    return found


def run_tasks(run: RunFolder) -> TaskSet:
    """The tasks a run was trained for: those recorded with its cache attributes (A-VB for a run from before
    task descriptions)."""
    return tasks_of(run.cache_attrs, str(run.path / CONFIG_FILE))


def _epoch_value(entry: Mapping[str, Any], key: str) -> float | None:
    """A Val metric of one `read_history` entry."""
    value = (entry.get("val") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _epoch_weights(entry: Mapping[str, Any], names: Sequence[str]) -> list[float] | None:
    """The loss weights of one `read_history` entry for the tasks `names`, in that order."""
    weights = entry.get("weights")
    if names and isinstance(weights, Mapping) and all(isinstance(weights.get(n), (int, float)) for n in names):
        return [float(weights[n]) for n in names]
    return None


def weight_names(run: RunInfo) -> list[str]:
    """The task names a run's history logs loss weights for: the keys of its first entry with weights, in the
    order of the run's tasks (names the tasks do not know last, as logged)."""
    for entry in run.history:
        weights = entry.get("weights")
        if isinstance(weights, Mapping) and weights:
            logged = [str(name) for name in weights]
            known = [name for name in run.tasks.names if name in logged]
            return known + [name for name in logged if name not in known]
    return []


def probe_tasks(data: Mapping[str, Any], where: str | os.PathLike = PROBE_JSON) -> TaskSet:
    """The tasks a probe.json records (`task_set`); A-VB for one written before it recorded them."""
    return tasks_of({"tasks": data.get("task_set")}, str(where))


def _member_tasks(ensemble: EnsembleFolder) -> TaskSet | None:
    """The tasks of the first member run whose config.json can be read and that knows every task of the
    ensemble; None when there is none."""
    seen: set[Path] = set()
    for members in ensemble.members.values():
        for run, _ in members:
            if run in seen:
                continue
            seen.add(run)
            try:
                folder = ensemble.member_dir(run)
                tasks = run_tasks(RunFolder(folder, read_run_config(folder), {}))
            except AvbError:
                continue
            if all(name in tasks for name in ensemble.members):
                return tasks
    return None


def ensemble_tasks(ensemble: EnsembleFolder) -> TaskSet | None:
    """The tasks of an ensemble's member runs; A-VB's when none can be read and the task names are A-VB's."""
    tasks = _member_tasks(ensemble)
    if tasks is None and all(name in AVB for name in ensemble.members):
        tasks = AVB
    return tasks


def ensemble_headlines(ensemble: EnsembleFolder) -> dict[str, tuple[str, str]]:
    """Task name -> (title, headline key) for each task of an ensemble, in its tasks' order: from the tasks its
    member runs were trained for; when none can be read (runs moved), A-VB's when the names are A-VB's, else
    the task name as title and the key its scores carry (`<task>_uar`, else `<task>_ccc`)."""
    tasks = ensemble_tasks(ensemble)
    names = list(ensemble.members)
    if tasks is not None:
        names = [n for n in tasks.names if n in ensemble.members] + [n for n in names if n not in tasks]
    scored = [ensemble.metrics, *(val for _, val in ensemble.runs)]
    out = {}
    for name in names:
        if tasks is not None and name in tasks:
            out[tasks[name].name] = (tasks[name].title, tasks[name].headline_key)
        else:
            key = next((f"{name}_{m}" for m in ("uar", "ccc") if any(f"{name}_{m}" in s for s in scored)),
                       f"{name}_ccc")
            out[name] = (name, key)
    return out


# ------------------------------------------------------------------------------------------------- plotting

def _figure_factory():
    """matplotlib's Figure with an Agg canvas; a clear install hint when the extra is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(f"avb report needs matplotlib: {PLOT_EXTRA_HINT}") from None

    def make(nrows: int, ncols: int, width: float, height: float):
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        return fig, axes

    return make


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()   # rendered first: the write then knows its size (for a full disk's message)
    fig.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue(), suffix=".png")
    return path


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - matplotlib is optional

    return MaxNLocator(integer=True)


def plot_curves(make: Any, runs: Sequence[RunInfo], tasks: TaskSet, path: Path) -> Path | None:
    """Validation headline score per epoch, one panel per task of `tasks`, one line per run."""
    plotted = False
    fig, axes = make(1, len(tasks), 4.2 * len(tasks), 3.6)
    for ax, task in zip(axes[0], tasks):
        key = task.headline_key
        for run in runs:
            points = [(h.get("epoch", i), _epoch_value(h, key)) for i, h in enumerate(run.history)]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=run.label)
                plotted = True
            if isinstance(run.metrics.get("best_epoch"), int) and isinstance(run.metrics.get(key), (int, float)):
                ax.plot([run.metrics["best_epoch"]], [run.metrics[key]], marker="*", color="black", ms=8)
        ax.set_title(f"{task.title} (Val {task.metric.upper()})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.grid(alpha=0.3)
    if not plotted:
        return None
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(runs) <= 24:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return _save(fig, path)


def plot_weights(make: Any, weighting: str, runs: Sequence[RunInfo], path: Path) -> Path | None:
    """One panel per run of this weighting, one line per task (the tasks its history logs weights for): the
    logged loss weight per epoch."""
    names_of = {id(r): weight_names(r) for r in runs}
    runs = [r for r in runs if any(_epoch_weights(h, names_of[id(r)]) for h in r.history)]
    if not runs:
        return None
    ncols = min(3, len(runs))
    nrows = -(-len(runs) // ncols)
    fig, axes = make(nrows, ncols, 4.5 * ncols, 3.2 * nrows)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, runs):
        names = names_of[id(run)]
        rows = [(h.get("epoch", i), _epoch_weights(h, names)) for i, h in enumerate(run.history)]
        rows = [(e, w) for e, w in rows if w is not None]
        epochs = [e for e, _ in rows]
        values = np.array([w for _, w in rows])
        for k, name in enumerate(names):
            ax.plot(epochs, values[:, k], marker=".", label=run.tasks[name].title if name in run.tasks else name)
        ax.set_title(run.label, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.set_ylabel(WEIGHT_MEANING.get(weighting, f"{weighting} weight"))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"loss weights per task: {weighting}")
    return _save(fig, path)


def ablation_grid(runs: Sequence[RunInfo], tasks: TaskSet) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Mean Val headline score over seeds per (arch, weighting), per task of `tasks` and for the mean (key
    `SELECTION_KEY`); NaN where no run exists."""
    archs = sorted({r.arch for r in runs})
    weightings = sorted({r.weighting for r in runs})
    grids = {}
    for name in (*tasks.names, SELECTION_KEY):
        key = tasks[name].headline_key if name in tasks else SELECTION_KEY
        grid = np.full((len(archs), len(weightings)), np.nan)
        for i, arch in enumerate(archs):
            for j, weighting in enumerate(weightings):
                values = [float(r.metrics[key]) for r in runs if r.arch == arch and r.weighting == weighting
                          and isinstance(r.metrics.get(key), (int, float))]
                if values:
                    grid[i, j] = float(np.mean(values))
        grids[name] = grid
    return archs, weightings, grids


def plot_ablation(make: Any, runs: Sequence[RunInfo], tasks: TaskSet, path: Path) -> Path | None:
    archs, weightings, grids = ablation_grid(runs, tasks)
    if all(np.isnan(grid).all() for grid in grids.values()):
        return None
    panels = (*tasks.names, SELECTION_KEY)
    fig, axes = make(1, len(panels), 3.4 * len(panels), 1.2 + 0.6 * len(archs))
    for ax, name in zip(axes[0], panels):
        grid = grids[name]
        ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(weightings)), weightings, rotation=30)
        ax.set_yticks(range(len(archs)), archs)
        ax.set_title(tasks[name].title if name in tasks else "mean", fontsize="medium")
        finite = grid[np.isfinite(grid)]
        mid = float(finite.mean()) if finite.size else 0.0
        for i in range(len(archs)):
            for j in range(len(weightings)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize="small",
                            color="black" if grid[i, j] >= mid else "white")
    fig.suptitle("Val score by architecture × loss weighting (mean over seeds)")
    return _save(fig, path)


def plot_ensemble(make: Any, ensemble: EnsembleFolder, path: Path) -> Path | None:
    """Per task: every single run's Val score (dots; the task's members in orange) and the ensemble's (red line)."""
    runs = ensemble.runs
    if not runs and not ensemble.metrics:
        return None
    headlines = ensemble_headlines(ensemble)
    names = (*headlines, SELECTION_KEY)
    fig, axes = make(1, len(names), 2.6 * len(names), 3.4)
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same picture
    jitter = rng.uniform(-0.3, 0.3, len(runs))
    members = ensemble.members
    for ax, name in zip(axes[0], names):
        title, key = headlines.get(name, ("mean", SELECTION_KEY))
        chosen = ({run for run, _ in members[name]} if name in headlines
                  else {run for ms in members.values() for run, _ in ms})
        for is_member, colour, label in ((False, "tab:blue", "single run"), (True, "tab:orange", "member")):
            points = [(x, float(val[key])) for x, (run, val) in zip(jitter, runs)
                      if (run in chosen) == is_member and isinstance(val.get(key), (int, float))]
            if points:
                ax.scatter(*zip(*points), s=20, color=colour, label=label, zorder=3)
        if isinstance(ensemble.metrics.get(key), (int, float)):
            ax.axhline(float(ensemble.metrics[key]), color="tab:red", lw=2.5, label="ensemble", zorder=2)
        ax.set_xlim(-0.5, 0.5)
        ax.set_xticks([])
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="x-small", loc="best")
    fig.suptitle(f"{ensemble.path.name}: {ensemble.strategy or '?'} ensemble vs single runs (Val)")
    return _save(fig, path)


def read_trials(search: Path) -> list[dict[str, str]]:
    with open(search / TRIALS_CSV, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def search_importances(search: Path) -> dict[str, float]:
    """Optuna's parameter importances of a search's study ({} without Optuna or with too few trials)."""
    try:
        import optuna  # noqa: PLC0415
    except ImportError:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(search / STUDY_FILE).resolve()}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or not any(t.params for t in complete):
        return {}
    with warnings.catch_warnings():   # "some regimes have less than 2 trials": the figure says how many there are
        warnings.simplefilter("ignore")
        return dict(optuna.importance.get_param_importances(study))


def plot_search(make: Any, search: Path, path: Path) -> Path | None:
    """The optimisation history (each finished trial's Val mean, the best so far) and the parameter importances."""
    rows = [r for r in read_trials(search) if r["state"] == "COMPLETE" and r["value"]]
    if not rows:
        return None
    importances = search_importances(search)
    fig, axes = make(1, 2 if importances else 1, 11 if importances else 6, 3.8)
    numbers = [int(r["number"]) for r in rows]
    values = [float(r["value"]) for r in rows]
    ax = axes[0][0]
    ax.plot(numbers, values, "o", label="trial")
    ax.step(numbers, np.maximum.accumulate(values), where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("Val mean")
    ax.set_title(f"{search.name}: {len(rows)} finished trials", fontsize="medium")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.legend(fontsize="small")
    if importances:
        ax = axes[0][1]
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance (Optuna)")
        ax.set_title("parameter importances", fontsize="medium")
    return _save(fig, path)


def probe_grid(data: Mapping[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    """(layers, tasks, headline scores [layers, tasks]) of a probe.json; NaN where a score is missing."""
    layers, tasks = list(data["layers"]), list(data["tasks"])
    known = probe_tasks(data)
    grid = np.full((len(layers), len(tasks)), np.nan)
    for i, layer in enumerate(layers):
        for j, task in enumerate(tasks):
            value = data["scores"].get(layer, {}).get(task, {}).get(known[task].metric)
            if isinstance(value, (int, float)):
                grid[i, j] = float(value)
    return layers, tasks, grid


def plot_probe(make: Any, probe: ProbeInfo, path: Path) -> Path | None:
    """Layer x task heatmap of the probes' Val scores. Colour is scaled per column (UAR and CCC have different
    ranges and chance levels), the number in each cell is the score itself, the best layer is boxed."""
    layers, tasks, grid = probe_grid(probe.data)
    known = probe.tasks
    if not np.isfinite(grid).any():
        return None
    low, high = np.nanmin(grid, 0), np.nanmax(grid, 0)
    shade = (grid - low) / np.where(high > low, high - low, 1.0)
    fig, axes = make(1, 1, 1.6 + 1.5 * len(tasks), 1.0 + 0.36 * len(layers))
    ax = axes[0][0]
    ax.imshow(np.ma.masked_invalid(shade), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tasks)), [f"{known[t].title}\n{known[t].metric.upper()}" for t in tasks])
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    from matplotlib.patches import Rectangle  # noqa: PLC0415 - matplotlib is optional

    for j in range(len(tasks)):
        column = grid[:, j]
        best = int(np.nanargmax(column)) if np.isfinite(column).any() else None
        for i in range(len(layers)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize="small",
                        color="black" if shade[i, j] >= 0.5 else "white",
                        fontweight="bold" if i == best else "normal")
        if best is not None:
            ax.add_patch(Rectangle((j - 0.5, best - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    where = probe.data.get("backbone", {}).get("model_type") or Path(str(probe.data.get("cache", ""))).name
    fig.suptitle(f"linear probes ({where}): Val score per layer and task, best layer boxed")
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------- tables

def results_table(inputs: ReportInputs) -> tuple[list[str], list[list[str]]]:
    """Header and rows of every run's and ensemble's Val scores (computed from their metrics.json): the
    headline score of each of their tasks (the union, in order of appearance), then the mean."""
    keys: list[str] = []
    for headline_keys in [list(r.tasks.headline_keys.values()) for r in inputs.runs] \
            + [[key for _, key in ensemble_headlines(e).values()] for e in inputs.ensembles]:
        keys += [k for k in headline_keys if k not in keys]
    keys.append(SELECTION_KEY)
    header = ["run", "arch", "weighting", "seed", "best_epoch", *keys]
    rows = []
    for run in inputs.runs:
        rows.append([run.path.name, run.arch, run.weighting, str(run.seed), str(run.metrics.get("best_epoch", ""))]
                    + [score_text(run.metrics.get(k)) for k in keys])
    for ens in inputs.ensembles:
        rows.append([ens.path.name, "ensemble", ens.strategy or "", "", ""]
                    + [score_text(ens.metrics.get(k)) for k in keys])
    return header, rows


def markdown_table_html(text: str) -> str:
    """A results.md or probe.md (pipe tables with **bold**/*italic* cells, and paragraphs) as HTML, in order."""
    parts: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head = "".join(f"<th>{_inline_md(c)}</th>" for c in table[0])
            body = "\n".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in row) + "</tr>"
                             for row in table[1:])
            parts.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>")
            table.clear()

    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line[1:-1].split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| separator row
                table.append(cells)
            continue
        flush()
        if line:
            parts.append(f"<p>{_inline_md(line.lstrip('# '))}</p>")
    flush()
    return "".join(parts)


def _inline_md(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", out)




def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _data_links(inputs: ReportInputs, out: Path) -> list[Path]:
    files: list[Path] = []
    for ablation in inputs.ablations:
        files += [ablation / n for n in (RESULTS_CSV, RESULTS_JSON, RESULTS_MD, CONFIG_FILE)]
    for ens in inputs.ensembles:
        files += [ens.path / METRICS_FILE, ens.path / MEMBERS_FILE]
    for run in inputs.runs:
        files += [run.path / METRICS_FILE, run.path / CONFIG_FILE]
    for probe in inputs.probes:
        files += [probe.path / n for n in (PROBE_CSV, PROBE_JSON, PROBE_MD)]
    files += [search / TRIALS_CSV for search in inputs.searches]
    return [f for f in files if f.is_file()]


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def report_title(inputs: ReportInputs) -> str:
    """'<corpus> results' when every run, ensemble and probe is of one corpus ('A-VB results'), else 'Results'."""
    names = {r.tasks.title for r in inputs.runs} | {p.tasks.title for p in inputs.probes}
    for ens in inputs.ensembles:
        tasks = ensemble_tasks(ens)
        names.add(tasks.title if tasks is not None else "")
    return f"{names.pop()} results" if len(names) == 1 and "" not in names else "Results"


def write_index(out: Path, inputs: ReportInputs, figures: Sequence[tuple[str, Path]]) -> Path:
    header, rows = results_table(inputs)
    title = html.escape(report_title(inputs))
    parts = ["<!doctype html>", f"<html><head><meta charset='utf-8'><title>{title}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style>",
             "</head><body>", f"<h1>{title}</h1>"]
    for ablation in inputs.ablations:
        if (ablation / RESULTS_MD).is_file():
            parts += [f"<h2>Ablation {html.escape(ablation.name)} (Table I layout, validation)</h2>",
                      markdown_table_html((ablation / RESULTS_MD).read_text(encoding="utf-8"))]
    for probe in inputs.probes:
        if (probe.path / PROBE_MD).is_file():
            parts += [f"<h2>Linear probes {html.escape(probe.path.name)} (validation)</h2>",
                      markdown_table_html((probe.path / PROBE_MD).read_text(encoding="utf-8"))]
    if rows:
        parts += ["<h2>Runs and ensembles (validation)</h2>", _html_table(header, rows)]
    for title, path in figures:
        src = html.escape(_rel(path, out))
        parts += [f"<h2>{html.escape(title)}</h2>", f"<a href='{src}'><img src='{src}' alt='{html.escape(title)}'></a>"]
    parts.append("<h2>Data</h2><ul>")
    for path in _data_links(inputs, out):
        href = html.escape(_rel(path, out))
        parts.append(f"<li><a href='{href}'>{href}</a></li>")
    parts += ["</ul>", "</body></html>", ""]
    path = out / "index.html"
    write_text_atomic(path, "\n".join(parts))
    return path


# ----------------------------------------------------------------------------------------------- the driver

def make_report(dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Draw every figure the inputs allow and the index page; returns (files written, warnings)."""
    make = _figure_factory()
    inputs = collect_inputs(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []

    def add(title: str, path: Path | None) -> None:
        if path is not None:
            figures.append((title, path))

    groups: dict[TaskSet, list[RunInfo]] = {}
    for run in inputs.runs:
        groups.setdefault(run.tasks, []).append(run)
    tags: set[str] = set()
    for k, (tasks, group) in enumerate(groups.items()):
        # Runs of different task lists cannot share panels: each list gets its own figures, named after it.
        tag = "" if len(groups) == 1 else f"_{_safe(tasks.title)}"
        tag = tag if tag not in tags else f"{tag}_{k + 1}"
        tags.add(tag)
        of = "" if len(groups) == 1 else f" ({tasks.title}: {', '.join(tasks.names)})"
        add(f"Validation score per epoch{of}", plot_curves(make, group, tasks, out / f"curves{tag}.png"))
        for weighting in sorted({r.weighting for r in group}):
            runs = [r for r in group if r.weighting == weighting]
            add(f"Loss weights: {weighting}{of}",
                plot_weights(make, weighting, runs, out / f"weights_{weighting}{tag}.png"))
        if len({(r.arch, r.weighting) for r in group}) > 1:
            add(f"Ablation grid{of}", plot_ablation(make, group, tasks, out / f"ablation{tag}.png"))
    for ens in inputs.ensembles:
        add(f"Ensemble {ens.path.name} vs single runs",
            plot_ensemble(make, ens, out / f"ensemble_{_safe(ens.path.name)}.png"))
    for search in inputs.searches:
        add(f"Search {search.name}: optimisation history and parameter importances",
            plot_search(make, search, out / f"search_{_safe(search.name)}.png"))
    for probe in inputs.probes:
        add(f"Linear probes {probe.path.name}: Val score per layer and task",
            plot_probe(make, probe, out / f"probe_{_safe(probe.path.name)}.png"))
    index = write_index(out, inputs, figures)
    return [p for _, p in figures] + [index], inputs.warnings


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "ensemble"


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the PNG figures and index.html.")
def report_command(dirs: tuple[Path, ...], out: Path) -> None:
    """Plot DIRS (run, ablation, ensemble and probe dirs): Val curves, loss weights, the ablation grid,
    ensembles, and the layer x task heatmap of linear probes."""
    with command_errors():
        files, warnings = make_report(dirs, out)
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)
    for path in files:
        click.echo(str(path))
