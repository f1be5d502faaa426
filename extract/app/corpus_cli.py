"""`avb corpus check`: validate a corpus and summarise it before anything expensive runs on it.

The summary answers the questions one has before fine-tuning: are all labels sane, are the splits and class
counts what the paper reports, and will every wav decode (missing files, unreadable headers, silent or
overlong clips are all collected, not just the first, so one run lists everything to fix). Durations come
from WAV headers only (`wav_info`), which keeps a 59k-clip corpus to seconds.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.command import command_errors
from cache.command_kit.options import OptionOrArgumentCommand, option_or_argument
from extract.audio import MAX_SECONDS, AudioError, wav_info
from extract.corpus import Corpus, missing_wavs, read_corpus
from heads.tasks import COUNTRIES, SPLITS, TYPE

SHOW_FIRST = 5            # problem paths listed in the human-readable summary
PROGRESS_MIN_FILES = 500  # below this, a progress bar is noise


def audit_audio(corpus: Corpus, max_seconds: float = MAX_SECONDS, progress: bool = True) -> dict[str, Any]:
    """Header-level audit of every clip's wav: durations, formats seen, and every missing/unusable file."""
    from tqdm.auto import tqdm

    missing = set(missing_wavs(corpus))
    durations: list[float] = []
    rates: Counter[int] = Counter()
    channels: Counter[int] = Counter()
    unreadable: list[dict[str, str]] = []
    paths = [corpus.wav_path(clip) for clip in corpus.ids]
    bar = tqdm(paths, desc="reading wav headers", unit="file", leave=False,
               disable=not progress or len(paths) < PROGRESS_MIN_FILES)
    for path in bar:
        if path in missing:
            continue
        try:
            info = wav_info(path)
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


def summarise(corpus: Corpus) -> dict[str, Any]:
    """Label-side summary: clips per split, Train type counts, countries."""
    train = corpus.indices("Train")
    type_index = corpus.labels["type"][train, 0]
    type_counts = {name: int(np.sum(type_index == i)) for i, name in enumerate(TYPE.classes)}
    seen = Counter(corpus.countries)
    countries = {name: seen.pop(name, 0) for name in COUNTRIES}
    unknown = seen.pop("", 0)
    countries.update(sorted(seen.items()))  # names outside the official four are still shown
    countries["unknown"] = unknown
    return {
        "root": str(corpus.root),
        "label_files": [str(p) for p in corpus.label_files],
        "n_clips": len(corpus),
        "splits": {split: int(len(corpus.indices(split))) for split in SPLITS},
        "train_type_counts": type_counts,
        "countries": countries,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"corpus {summary['root']}",
             f"label files: {', '.join(Path(p).name for p in summary['label_files'])}",
             f"clips: {summary['n_clips']} ("
             + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()) + ")",
             "Train types: " + ", ".join(f"{k} {v}" for k, v in summary["train_type_counts"].items()),
             "countries: " + ", ".join(f"{k} {v}" for k, v in summary["countries"].items())]
    audio = summary["audio"]
    if not audio["checked"]:
        lines.append("audio: not checked (--no-audio)")
        return "\n".join(lines)
    d = audio["duration_s"]
    lines.append(f"durations: min {d['min']:.2f} s, mean {d['mean']:.2f} s, max {d['max']:.2f} s"
                 if d else "durations: no readable audio")
    lines.append("sample rates: " + (", ".join(f"{k} Hz x{v}" for k, v in audio["sample_rates"].items()) or "none"))
    lines.append("channels: " + (", ".join(f"{k} x{v}" for k, v in audio["channels"].items()) or "none"))
    lines.append(f"missing wav files: {audio['n_missing']}")
    lines += [f"  {p}" for p in audio["missing"][:SHOW_FIRST]]
    lines.append(f"unreadable wav files: {audio['n_unreadable']}")
    lines += [f"  {u['path']}: {u['reason']}" for u in audio["unreadable"][:SHOW_FIRST]]
    return "\n".join(lines)


@click.group("corpus")
def corpus_group() -> None:
    """Validate and summarise an A-VB corpus."""


@corpus_group.command("check", cls=OptionOrArgumentCommand)
@option_or_argument("--corpus", "root", "ROOT", type=click.Path(file_okay=False, path_type=Path),
                    help="Corpus root in the official layout (labels/ and audio/wav/).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of text.")
@click.option("--no-audio", is_flag=True, help="Validate the label files only; do not look at the wav files.")
def check_command(root: Path, as_json: bool, no_audio: bool) -> None:
    """Validate the corpus at --corpus (labels/ and audio/wav/) and print a summary.

    Exits non-zero if a label file is invalid or any wav file is missing or unreadable.
    """
    with command_errors():
        corpus = read_corpus(root)
        summary = summarise(corpus)
        summary["audio"] = {"checked": False} if no_audio else audit_audio(corpus)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    audio = summary["audio"]
    if audio["checked"] and (audio["n_missing"] or audio["n_unreadable"]):
        first = audio["missing"][0] if audio["missing"] else audio["unreadable"][0]["path"]
        raise click.ClickException(f"{audio['n_missing']} missing and {audio['n_unreadable']} unreadable wav files "
                                   f"(first: {first})")
