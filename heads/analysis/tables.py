"""The result tables of an ablation grid: results.csv (one row per run), results.json and results.md, shaped
like the paper's Table I (grouped by loss weighting, one row per architecture, the best seed's scores), with
bootstrap intervals and the paired comparison of `heads.analysis.comparison` when asked for.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.command_kit.atomic import write_json_atomic, write_text_atomic
from heads.analysis.bootstrap import BootstrapConfig
from heads.analysis.comparison import add_uncertainty, ci_keys, paired_markdown
from heads.metrics import score_text
from heads.names import ARCHS, WEIGHTING_TITLES, WEIGHTINGS
from heads.runs import RESULTS_CSV, RESULTS_JSON, RESULTS_MD
from heads.tasks import SELECTION_KEY, TaskSet, tasks_of


def table_columns(tasks: TaskSet) -> tuple[tuple[str, str], ...]:
    """Table I's columns, (metric key, header): each task's headline score (UAR or CCC), a regression task's
    Pearson's r beside it, then the mean (A-VB: TYPE UAR, TWO CCC, TWO ρ, ..., Mean)."""
    columns = []
    for t in tasks:
        columns.append((t.headline_key, f"{t.title} {t.metric.upper()}"))
        if not t.is_classification:
            columns.append((f"{t.name}_pearson", f"{t.title} ρ"))
    return (*columns, (SELECTION_KEY, "Mean"))


def result_fields(tasks: TaskSet, varied: Sequence[str] = ()) -> tuple[str, ...]:
    """The columns of results.csv (before any interval columns): a column per varied field after the seed."""
    return ("arch", "weighting", "seed", *varied, *tasks.metric_keys, SELECTION_KEY, "best_epoch")


def write_tables(out: Path, rows: list[dict], run_dirs: Sequence[Path], grid_record: dict[str, Any], cache: Any,
                 bootstrap: BootstrapConfig | None, varied: Sequence[str] = ()) -> None:
    """results.csv, results.json and results.md of the grid in `out` (`rows[i]` is the run in `run_dirs[i]`),
    with bootstrap intervals and paired comparisons when `bootstrap` is given; `varied` names the grid's extra
    axes (heads.training.axes), whose values the rows carry."""
    tasks = tasks_of(cache.attrs, str(cache.path))
    summary = summarise(tasks, rows, varied)
    uncertainty = None
    if bootstrap is not None:
        uncertainty = add_uncertainty(rows, summary, run_dirs, cache, bootstrap, varied)
    write_text_atomic(out / RESULTS_CSV, results_csv(tasks, rows, varied))
    write_json_atomic(out / RESULTS_JSON, {"config": grid_record, "runs": rows, "summary": summary,
                                           **({"bootstrap": uncertainty} if uncertainty else {})})
    write_text_atomic(out / RESULTS_MD, results_markdown(tasks, summary, uncertainty, varied))



# --------------------------------------------------------------------------------------------- tables

def results_csv(tasks: TaskSet, rows: Sequence[dict], varied: Sequence[str] = ()) -> str:
    """One line per run; rows carrying bootstrap intervals (`<key>_ci`) get `<key>_ci_low,<key>_ci_high` columns."""
    with_ci = [k for k in ci_keys(tasks) if rows and f"{k}_ci" in rows[0]]
    base = result_fields(tasks, varied)
    fields = list(base) + [f"{k}_ci_{end}" for k in with_ci for end in ("low", "high")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {k: row[k] for k in base}  # floats in full (repr) precision
        for k in with_ci:
            line[f"{k}_ci_low"], line[f"{k}_ci_high"] = row[f"{k}_ci"]
        writer.writerow(line)
    return buf.getvalue()


def summarise(tasks: TaskSet, rows: Sequence[dict], varied: Sequence[str] = ()) -> list[dict]:
    """One entry per configuration -- (weighting, arch) and the values of the varied axes -- in table order: the
    best seed's metrics (by Val mean) and mean/std over seeds."""
    out = []
    weightings = [w for w in WEIGHTINGS if any(r["weighting"] == w for r in rows)]
    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    keys = [k for k, _ in table_columns(tasks)]
    for w in weightings:
        for a in archs:
            combos = list(dict.fromkeys(tuple(r[n] for n in varied) for r in rows
                                        if r["weighting"] == w and r["arch"] == a))
            for combo in combos:
                cell = [r for r in rows if r["weighting"] == w and r["arch"] == a
                        and tuple(r[n] for n in varied) == combo]
                best = max(cell, key=lambda r: r[SELECTION_KEY])  # first seed wins a tie
                values = {k: np.array([r[k] for r in cell], dtype=np.float64) for k in keys}
                out.append({
                    "weighting": w, "arch": a, **({"vary": dict(zip(varied, combo))} if varied else {}),
                    "n_seeds": len(cell), "best_seed": best["seed"],
                    "best": {k: best[k] for k in keys},
                    "mean": {k: float(values[k].mean()) for k in keys},
                    # sample std over seeds (ddof=1); undefined for one seed
                    "std": {k: float(values[k].std(ddof=1)) if len(cell) > 1 else None for k in keys},
                })
    return out




def results_markdown(tasks: TaskSet, summary: Sequence[dict], uncertainty: dict | None = None,
                     varied: Sequence[str] = ()) -> str:
    """Table I of the paper: grouped by weighting, one row per architecture, best value per column in bold.

    With bootstrap results (`heads.analysis.comparison.add_uncertainty`), each cell also shows the best run's interval
    and a second table gives each configuration's paired win fraction against the best one per task.
    """
    columns = table_columns(tasks)
    keys = [k for k, _ in columns]
    best_per_col = {k: max(round(s["best"][k], 4) for s in summary) for k in keys} if summary else {}
    several = any(s["n_seeds"] > 1 for s in summary)
    lines = ["| Model | " + " | ".join(h for _, h in columns) + " |",
             "|---|" + "---|" * len(columns)]
    current = None
    for s in summary:
        if s["weighting"] != current:
            current = s["weighting"]
            lines.append(f"| **{WEIGHTING_TITLES[current]}** |" + " |" * len(columns))
        cells = []
        for k in keys:
            text = score_text(s["best"][k])
            if round(s["best"][k], 4) == best_per_col[k]:
                text = f"**{text}**"
            if "best_ci" in s:
                low, high = s["best_ci"][k]
                text += f" [{score_text(low)}, {score_text(high)}]"
            if s["n_seeds"] > 1:
                text += f" ({score_text(s['mean'][k])} ± {score_text(s['std'][k])})"
            cells.append(text)
        axes = ", ".join(f"{n}={s['vary'][n]}" for n in varied if s["vary"][n] != "")
        lines.append(f"| *{s['arch'].upper()}*{f' {axes}' if axes else ''} | " + " | ".join(cells) + " |")
    paired = paired_markdown(tasks, summary, WEIGHTING_TITLES, varied) if uncertainty else ""
    parts = ["Validation scores. Each cell: the run with the best validation mean of the headline scores"
             + (" (over seeds)" if several else "")]
    if uncertainty:
        parts.append(f"then its {uncertainty['level']:.0%} percentile-bootstrap interval over the "
                     f"{uncertainty['n_val_clips']} Val clips in brackets ({uncertainty['n_boot']} resamples, the same "
                     "for every run and task)")
    if several:
        parts.append("then the mean ± sample std over seeds in parentheses")
    note = ", ".join(parts) + "."
    if uncertainty:
        note += (" Second table: per column, the fraction of those resamples on which the configuration's best run"
                 " scores higher than the best configuration's (a paired bootstrap, ties counted half; below .025"
                 " the best is significantly better at the 5 % level, two-sided).")
    note += " Best value per column in bold."
    return "\n".join(lines) + "\n\n" + (paired + "\n" if paired else "") + note + "\n"
