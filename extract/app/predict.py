"""`avb predict`: a trained model's tasks for new audio files, as CSV.

    avb predict --model BACKBONE --heads RUN_OR_ENSEMBLE --out FILE.csv AUDIO...     (PyTorch)
    avb predict --heads FINETUNE_OUTPUT --out FILE.csv AUDIO...                      (its own backbone)
    avb predict --model-dir EXPORTED --out FILE.csv AUDIO...                         (ONNX; torch not imported)
    ... --window 2.5 --hop 1.25                                                      (long recordings)

The work is `extract.serve.predictor.Predictor`, which the Python API uses too; this module reads the options
and writes the CSV. Without --window a row per file holds the prediction for its first clip_seconds (as the
dump reads a corpus clip). With --window, FILE.csv holds one row per file (the mean over its windows) and
FILE.windows.csv one row per window (path, start_s, end_s, ...). Nothing here imports torch, so the
`--model-dir` path runs where torch is not installed.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from cache.command_kit.command import command_errors
from cache.command_kit.options import progress_option
from extract.serve.errors import PredictError
from extract.serve.exported import is_export_dir
from extract.serve.predictor import Predictions, Predictor
from heads.submission import number_text


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([number_text(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns])
    return buf.getvalue()


def windows_path(out: str | os.PathLike) -> Path:
    """Where the per-window rows go beside --out: pred.csv -> pred.windows.csv."""
    out = Path(out)
    return out.with_name(f"{out.stem}.windows.csv")


def write_predictions(path: str | os.PathLike, preds: Predictions) -> list[Path]:
    """FILE.csv (one row per input) and, in window mode, FILE.windows.csv; each written atomically."""
    from cache.command_kit.atomic import write_text_atomic  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise PredictError(f"--out {path} is a directory; give the .csv file to write")
    written = []
    if preds.window_values is not None:
        columns = ["path", "start_s", "end_s", *preds.columns()[1:]]
        write_text_atomic(windows_path(path), _csv_text(columns, preds.window_records()))
        written.append(windows_path(path))
    write_text_atomic(path, _csv_text(preds.columns(), preds.records()))
    return [path, *written]


@click.command("predict")
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model", default=None,
              help="The backbone the heads' cache was dumped from (avb finetune's OUT/backbone, or a checkpoint). "
                   "Optional when --heads is a fine-tuning output: its own OUT/backbone.")
@click.option("--heads", "heads_dir", default=None, type=click.Path(path_type=Path),
              help="A run dir (config.json + head.safetensors), an ensemble dir (members.json), or a fine-tuning "
                   "output (avb finetune's OUT: its own head on its own backbone, no cache needed).")
@click.option("--model-dir", default=None, type=click.Path(path_type=Path),
              help="A folder written by avb export, run with onnxruntime (no PyTorch needed); instead of --heads.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The CSV file to write.")
@click.option("--window", default=None, type=float,
              help="Seconds: predict every window of this length (long recordings of any length, read block by "
                   "block); FILE.csv gets the mean per file, FILE.windows.csv one row per window.")
@click.option("--hop", default=None, type=float, help="Seconds between window starts (default: --window).")
@click.option("--batch-size", default=4, show_default=True, type=int,
              help="Clips or windows per forward pass. 4 keeps a wav2vec2-base model under 1 GB of RAM and was as "
                   "fast as 16 on a CPU (README, Long recordings); raise it on a GPU.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable audio files with a warning instead of stopping.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps (--model-dir: cpu or cuda).")
@progress_option()
def predict_command(audio: tuple[Path, ...], model: str | None, heads_dir: Path | None, model_dir: Path | None,
                    out: Path, window: float | None, hop: float | None, batch_size: int, skip_bad: bool,
                    device: str, progress: bool) -> None:
    """Predict the tasks for AUDIO (files of any format soundfile reads, or folders searched recursively). One
    CSV row per file: path, then per task its columns (a classification task: the class and p_<class> per
    class). A-VB: Voc_Type, p_<class>, then the Two, High and Culture columns."""
    with command_errors():  # PredictError, AudioError, BackboneLoadError, HeadConfigError, write errors, signals
        if (heads_dir is None) == (model_dir is None):
            raise PredictError("give exactly one of --heads (a run, ensemble or fine-tuning output) and "
                               "--model-dir (a folder written by avb export)")
        if model_dir is not None and not is_export_dir(model_dir):
            raise PredictError(f"--model-dir {model_dir}: not a folder written by avb export (its config.json "
                               "marks it); a run, ensemble or fine-tuning output goes to --heads")
        predictor = Predictor.load(model_dir or heads_dir, model=model, device=device, progress=progress)
        preds = predictor.predict(list(audio), window=window, hop=hop, batch_size=batch_size, skip_bad=skip_bad,
                                  progress=progress)
        for message in preds.skipped:
            click.echo(f"Warning: skipping {message}", err=True)
        for note in preds.notes:
            click.echo(f"Note: {note}", err=True)
        written = write_predictions(out, preds)
    extra = f", skipped {len(preds.skipped)} unreadable" if preds.skipped else ""
    n = len(preds.names)
    windows = f"; {len(preds.input_of_window)} windows in {written[1]}" if len(written) > 1 else ""
    click.echo(f"wrote {out} ({n} file{'s' if n != 1 else ''}{extra}{windows})")
