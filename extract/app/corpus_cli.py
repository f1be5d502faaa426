"""`avb corpus check` and `avb corpus init`: validate, describe and summarise a corpus before anything expensive
runs on it.

`check` reads the A-VB layout or a corpus described by a `corpus.yaml` (`extract.description`). The summary
answers the questions one has before fine-tuning: are all labels sane, are the splits and class counts what
one expects, and will every audio file decode (missing files, unreadable headers, silent or overlong clips are
all collected, not just the first, so one run lists everything to fix). Durations come from headers only
(`wav_info`, or soundfile's for FLAC/OGG/...), which keeps a 59k-clip corpus to seconds. The A-VB summary
(type counts, countries) is unchanged; a described corpus gets its tasks, class counts per split, value ranges
and number of groups instead.

`init` drafts a `corpus.yaml` from a label CSV and an audio folder, one printed line per guess.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.options import (
    OptionOrArgumentCommand,
    option_or_argument,
    progress_option,
)
from extract.audio import MAX_SECONDS, AudioError, audio_info, wav_info
from extract.corpus import Corpus, missing_wavs
from extract.decoded_audio import store_status
from extract.description import SPEC_FILE, open_corpus, write_draft
from heads.tasks import AVB, COUNTRIES, SPLITS

SHOW_FIRST = 5            # problem paths listed in the human-readable summary
PROGRESS_MIN_FILES = 500  # below this, a progress bar is noise


def audit_audio(corpus: Corpus, max_seconds: float = MAX_SECONDS, progress: bool = True) -> dict[str, Any]:
    """Header-level audit of every clip's audio file: durations, formats seen, and every missing/unusable file."""
    from tqdm.auto import tqdm

    described = corpus.audio_paths is not None
    paths = [corpus.audio_path(clip) for clip in corpus.ids]
    missing = {p for p in paths if not p.is_file()} if described else set(missing_wavs(corpus))
    read_info = audio_info if described else wav_info
    durations: list[float] = []
    rates: Counter[int] = Counter()
    channels: Counter[int] = Counter()
    unreadable: list[dict[str, str]] = []
    bar = tqdm(paths, desc="reading audio headers" if described else "reading wav headers", unit="file",
               leave=False, disable=not progress or len(paths) < PROGRESS_MIN_FILES)
    for path in bar:
        if path in missing:
            continue
        try:
            info = read_info(path)
        except AudioError as err:
            unreadable.append({"path": str(path), "reason": str(err).removeprefix(f"{path}: ")})
            continue
        rates[info.sample_rate] += 1
        channels[info.n_channels] += 1
        if info.n_frames == 0:
            unreadable.append({"path": str(path), "reason": "no audio samples (0 frames)"})
        elif info.duration_s > max_seconds:
            unreadable.append({"path": str(path), "reason": f"{info.duration_s:.2f} s long, more than the "
                                                            f"{max_seconds:g} s maximum"})
        else:
            durations.append(info.duration_s)
    d = np.asarray(durations, dtype=np.float64)
    return {
        "checked": True,
        "n_ok": len(durations),
        "duration_s": ({"min": float(d.min()), "mean": float(d.mean()), "max": float(d.max())} if d.size else None),
        "sample_rates": {str(k): v for k, v in sorted(rates.items())},
        "channels": {str(k): v for k, v in sorted(channels.items())},
        "n_missing": len(missing),
        "missing": [str(p) for p in sorted(missing)],
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
    }


def is_described(corpus: Corpus) -> bool:
    """A corpus read from a corpus.yaml (summarised by its tasks), not the A-VB layout."""
    return corpus.spec_path is not None or not corpus.tasks.is_avb


def summarise(corpus: Corpus) -> dict[str, Any]:
    """Label-side summary: clips per split, then Train type counts and countries (A-VB) or the tasks' class
    counts and value ranges (a described corpus)."""
    if is_described(corpus):
        return summarise_described(corpus)
    train = corpus.indices("Train")
    type_index = corpus.labels["type"][train, 0]
    type_counts = {name: int(np.sum(type_index == i)) for i, name in enumerate(AVB["type"].classes)}
    seen = Counter(corpus.countries)
    countries = {name: seen.pop(name, 0) for name in COUNTRIES}
    unknown = seen.pop("", 0)
    countries.update(sorted(seen.items()))  # names outside the official four are still shown
    countries["unknown"] = unknown
    return {
        "root": str(corpus.root),
        "label_files": [str(p) for p in corpus.label_files],
        "n_clips": len(corpus),
        "splits": {split: len(corpus.indices(split)) for split in SPLITS},
        "train_type_counts": type_counts,
        "countries": countries,
    }


def summarise_described(corpus: Corpus) -> dict[str, Any]:
    """A described corpus: clips per split, groups, and per task its class counts (classification, per split,
    unlabelled clips as 'unknown') or its value ranges (regression, per column and split, labelled clips only)."""
    splits = {split: corpus.indices(split) for split in SPLITS}
    tasks: list[dict[str, Any]] = []
    for task in corpus.tasks:
        entry: dict[str, Any] = task.to_json()
        values = corpus.labels[task.name]
        if task.is_classification:
            counts: dict[str, dict[str, int]] = {}
            for split, rows in splits.items():
                if not len(rows):
                    continue
                index = values[rows, 0]
                counts[split] = {name: int(np.sum(index == i)) for i, name in enumerate(task.classes)}
                counts[split]["unknown"] = int(np.isnan(index).sum())
            entry["class_counts"] = counts
        else:
            ranges: dict[str, dict[str, Any]] = {}
            for j, column in enumerate(task.columns):
                ranges[column] = {}
                for split, rows in splits.items():
                    if not len(rows):
                        continue
                    known = values[rows, j][~np.isnan(values[rows, j])].astype(np.float64)
                    ranges[column][split] = ({"n": int(known.size), "min": float(known.min()),
                                              "mean": float(known.mean()), "max": float(known.max())}
                                             if known.size else {"n": 0})
            entry["values"] = ranges
        tasks.append(entry)
    return {
        "name": corpus.name,
        "root": str(corpus.root),
        "spec": str(corpus.spec_path) if corpus.spec_path is not None else None,
        "label_files": [str(p) for p in corpus.label_files],
        "n_clips": len(corpus),
        "splits": {split: len(rows) for split, rows in splits.items()},
        "n_groups": len(set(corpus.groups)) if corpus.groups else None,
        "tasks": tasks,
    }


def _format_tasks(summary: dict[str, Any]) -> list[str]:
    lines = []
    for task in summary["tasks"]:
        if task["kind"] == "classification":
            lines.append(f"task {task['name']}: classification, column {task['columns'][0]}, "
                         f"{len(task['classes'])} classes: {', '.join(task['classes'])}")
            for split, counts in task["class_counts"].items():
                shown = [f"{k} {v}" for k, v in counts.items() if k != "unknown" or v]
                lines.append(f"  {split}: " + ", ".join(shown))
        else:
            lines.append(f"task {task['name']}: regression, column{'s' if len(task['columns']) > 1 else ''} "
                         f"{', '.join(task['columns'])}")
            for column, by_split in task["values"].items():
                parts = [(f"{split} {r['n']} in [{r['min']:.4g}, {r['max']:.4g}], mean {r['mean']:.4g}"
                          if r["n"] else f"{split} none") for split, r in by_split.items()]
                lines.append(f"  {column}: " + "; ".join(parts))
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    if "tasks" in summary:
        return _format_described(summary)
    lines = [f"corpus {summary['root']}",
             f"label files: {', '.join(Path(p).name for p in summary['label_files'])}",
             f"clips: {summary['n_clips']} ("
             + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()) + ")",
             "Train types: " + ", ".join(f"{k} {v}" for k, v in summary["train_type_counts"].items()),
             "countries: " + ", ".join(f"{k} {v}" for k, v in summary["countries"].items())]
    return "\n".join(lines + _format_audio(summary["audio"], "wav"))


def _format_described(summary: dict[str, Any]) -> str:
    lines = [f"corpus {summary['name']} ({summary['spec'] or summary['root']})",
             f"label files: {', '.join(Path(p).name for p in summary['label_files'])}",
             f"clips: {summary['n_clips']} ("
             + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()) + ")",
             f"groups: {summary['n_groups'] if summary['n_groups'] is not None else 'none (no group column)'}"]
    return "\n".join(lines + _format_tasks(summary) + _format_audio(summary["audio"], "audio"))


def _format_audio(audio: dict[str, Any], noun: str) -> list[str]:
    if not audio["checked"]:
        return ["audio: not checked (--no-audio)"]
    lines = []
    d = audio["duration_s"]
    lines.append(f"durations: min {d['min']:.2f} s, mean {d['mean']:.2f} s, max {d['max']:.2f} s"
                 if d else "durations: no readable audio")
    lines.append("sample rates: " + (", ".join(f"{k} Hz x{v}" for k, v in audio["sample_rates"].items()) or "none"))
    lines.append("channels: " + (", ".join(f"{k} x{v}" for k, v in audio["channels"].items()) or "none"))
    lines.append(f"missing {noun} files: {audio['n_missing']}")
    lines += [f"  {p}" for p in audio["missing"][:SHOW_FIRST]]
    lines.append(f"unreadable {noun} files: {audio['n_unreadable']}")
    lines += [f"  {u['path']}: {u['reason']}" for u in audio["unreadable"][:SHOW_FIRST]]
    return lines


@click.group("corpus")
def corpus_group() -> None:
    """Validate, describe and summarise a corpus."""


@corpus_group.command("check", cls=OptionOrArgumentCommand)
@option_or_argument("--corpus", "root", "ROOT", type=click.Path(file_okay=False, path_type=Path), required=False,
                    help=f"Corpus folder: its {SPEC_FILE} when it has one, else the A-VB layout (labels/ and "
                         f"audio/wav/).")
@click.option("--spec", type=click.Path(dir_okay=False, path_type=Path),
              help=f"A corpus description ({SPEC_FILE}) kept elsewhere; replaces --corpus.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of text.")
@click.option("--no-audio", is_flag=True, help="Validate the labels only; do not look at the audio files.")
def check_command(root: Path | None, spec: Path | None, as_json: bool, no_audio: bool) -> None:
    """Validate the corpus at --corpus (or described by --spec) and print a summary.

    Exits non-zero if a label file or the description is invalid or any audio file is missing or unreadable.
    """
    if root is None and spec is None:
        raise click.UsageError("Missing argument 'ROOT'.")
    if root is not None and spec is not None:
        raise click.UsageError("--corpus and --spec name two corpora; give one of them")
    with command_errors():
        corpus = open_corpus(root, spec)
        summary = summarise(corpus)
        summary["audio"] = {"checked": False} if no_audio else audit_audio(corpus)
        summary["decoded_audio"] = store_status(corpus)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    store = summary["decoded_audio"]
    if store is not None and not as_json:
        click.echo(f"decoded audio: {store['path']}, " + (f"matches the corpus ({store['clips']} clips, "
                   f"{store['dtype']}): finetune and dump read it" if store["fresh"] else
                   f"does NOT match the corpus ({store['why']}): avb corpus decode --rebuild"))
    audio = summary["audio"]
    if audio["checked"] and (audio["n_missing"] or audio["n_unreadable"]):
        first = audio["missing"][0] if audio["missing"] else audio["unreadable"][0]["path"]
        noun = "audio" if is_described(corpus) else "wav"
        raise click.ClickException(f"{audio['n_missing']} missing and {audio['n_unreadable']} unreadable {noun} "
                                   f"files (first: {first})")


@corpus_group.command("init")
@click.option("--labels", "labels", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The label CSV (one row per clip).")
@click.option("--audio", "audio", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The folder of audio files (WAV, FLAC, OGG, ...).")
@click.option("--out", "out", default=Path(SPEC_FILE), show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The description to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def init_command(labels: Path, audio: Path, out: Path, force: bool) -> None:
    """Draft a corpus description from a label CSV and an audio folder.

    Guesses the id column (values matching the audio file names), a split column (Train/Val/Test), a group
    column (speaker, actor, ...) and one task per label column: numbers become regression, a few repeated
    values classification. Prints one line per guess; edit the file, then run `avb corpus check`.
    """
    from extract.description import read_described_corpus

    with command_errors():
        draft = write_draft(labels, audio, out, force=force)
    for line in draft.decisions:
        click.echo(line)
    click.echo(f"wrote {out}")
    try:
        corpus = read_described_corpus(out)
    except AvbError as err:
        click.echo(f"the draft does not read as a corpus yet, edit it: {err}")
    else:
        click.echo(f"it reads as a corpus of {len(corpus)} clips and {len(corpus.tasks)} tasks; next: "
                   f"avb corpus check --spec {out}")


@corpus_group.command("decode")
@click.option("--corpus", "root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Corpus folder: its {SPEC_FILE} when it has one, else the A-VB layout.")
@click.option("--spec", type=click.Path(dir_okay=False, path_type=Path),
              help=f"A corpus description ({SPEC_FILE}) kept elsewhere.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The store to write (default: CORPUS/audio-16k.h5, where finetune and dump look for it).")
@click.option("--rebuild", is_flag=True, help="Decode every clip again (a store that no longer matches the corpus).")
@progress_option()
def decode_command(root: Path | None, spec: Path | None, out: Path | None, rebuild: bool, progress: bool) -> None:
    """Decode every clip once to 16 kHz mono into one HDF5 file that fine-tuning and the dump read instead of
    the audio files (int16 where that is lossless, else float32). Resumes a killed decode.

    Under `accelerate launch -m extract.decode ...` rank 0 decodes and writes; the other processes wait, then
    open and check the finished store."""
    from extract.decoded_audio import decode_corpus

    if root is None and spec is None:
        raise click.UsageError("give --corpus or --spec")
    with command_errors():
        corpus = open_corpus(root, spec)
        done = decode_corpus(corpus, out, rebuild=rebuild, progress=progress)
    if not done.main:           # rank 0 speaks for every process
        return
    others = f"the other {done.world - 1} of {done.world} processes" if done.world > 1 else ""
    if done.skipped:
        click.echo(f"{done.path} is complete and matches the corpus ({done.clips} clips, {done.dtype}); nothing to do "
                   f"(--rebuild decodes again){f'; {others} checked it too' if others else ''}")
        return
    others = f"; rank 0 wrote it, {others} waited and checked it" if others else ""
    resumed = f", resumed after {done.resumed_from}" if done.resumed_from else ""
    click.echo(f"wrote {done.path} ({done.clips} clips, {done.samples / 16000 / 3600:.2f} h of audio as "
               f"{done.dtype}{resumed}){others}")
