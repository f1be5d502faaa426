"""`Predictor`: a trained model applied to audio files or arrays, as whole clips or as windows of long recordings.

One class serves `avb predict` and the Python API, over two engines that take the same batches:
  - PyTorch: a run, an ensemble or a fine-tuning output on its backbone (`extract.serve.model.ServedModel`);
  - ONNX: a folder written by `avb export`, run by onnxruntime. This path never imports torch, so a deployment
    needs numpy, scipy, soundfile and onnxruntime only.

Audio is decoded by `extract.audio` (soundfile, down-mix, polyphase resampling to 16 kHz). Clip mode (the
default) reads the first `clip_seconds` of each input, zero-padded with a mask, exactly as the dump reads a
corpus clip. Window mode reads windows of `window` s every `hop` s block by block (memory bounded by the
block, not the recording), gives one output per window and per input the mean of its windows' outputs
(a classification task's class: the arg-max of the mean probabilities).

    predictor = Predictor.load("export/")            # or a run / ensemble dir with model="backbone/"
    preds = predictor.predict(["a.flac", "b.wav"], window=2.5, hop=1.25)
    preds.records()          # one dict per input: path, class and p_<class> / values per task
    preds.window_records()   # one dict per window: path, start_s, end_s, ...
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.audio import (
    AUDIO_EXTENSIONS,
    MAX_SECONDS,
    SAMPLE_RATE,
    AudioError,
    audio_info,
    audio_windows,
    crop_or_pad,
    load_audio,
    window_samples,
    window_starts,
)
from extract.serve.errors import PredictError
from extract.serve.exported import ExportedFolder, is_export_dir, read_export
from heads.tasks import TaskSet


def find_audio(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the audio files inside (`AUDIO_EXTENSIONS`, recursively, sorted);
    order kept, duplicates dropped."""
    out: list[Path] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()),
                           key=lambda p: p.relative_to(path).as_posix())
            if not found:
                raise PredictError(f"{path}: folder holds no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
        elif path.exists():
            found = [path]
        else:
            raise PredictError(f"{path}: no such file or folder")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise PredictError("no audio files given")
    return out


@dataclass
class Source:
    """One input: a file (read when its turn comes) or a waveform already at 16 kHz mono."""

    name: str
    path: Path | None = None
    wave: np.ndarray | None = None


def as_sources(inputs: Any) -> list[Source]:
    """Paths and folders (str / PathLike), 1-D float arrays at 16 kHz, or (array, sample_rate) pairs -> sources.
    A single path or array counts as a list of one."""
    from extract.audio import to_mono_16k  # noqa: PLC0415

    if isinstance(inputs, (str, os.PathLike, np.ndarray)) or _is_pair(inputs):
        inputs = [inputs]
    sources: list[Source] = []
    paths: list[Any] = []          # consecutive paths are expanded together (duplicates among them dropped)

    def flush() -> None:
        if paths:
            sources.extend(Source(str(p), path=p) for p in find_audio(paths))
            paths.clear()

    for k, item in enumerate(inputs):
        if isinstance(item, (str, os.PathLike)):
            paths.append(item)
            continue
        flush()
        wave, rate = item if _is_pair(item) else (item, SAMPLE_RATE)
        wave = np.asarray(wave)
        if wave.ndim not in (1, 2) or wave.dtype.kind != "f":
            raise PredictError(f"input {k}: expected a float waveform [samples] or [samples, channels], got "
                               f"{wave.dtype} {wave.shape}")
        name = f"array_{k}"
        try:
            sources.append(Source(name, wave=to_mono_16k(name, wave.astype(np.float64), int(rate))))
        except AudioError as err:
            raise PredictError(str(err)) from None
    flush()
    if not sources:
        raise PredictError("no audio given")
    return sources


def _is_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], np.ndarray)


# ------------------------------------------------------------------------------------------------ engines

class TorchEngine:
    """`ServedModel` on a torch device: (waves [B, S], mask [B, S]) numpy -> task -> [B, out_dim] float64."""

    def __init__(self, served: Any, device: Any) -> None:
        self.served = served.to(device).eval()
        self.device = device

    def __call__(self, waves: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        import torch  # noqa: PLC0415

        with torch.inference_mode():
            out = self.served.outputs(torch.from_numpy(waves).to(self.device), torch.from_numpy(mask).to(self.device))
        return {name: values.double().cpu().numpy() for name, values in out.items()}


class OnnxEngine:
    """An exported folder's model.onnx in onnxruntime: the same batches in, the same outputs out."""

    def __init__(self, folder: ExportedFolder, device: str = "cpu") -> None:
        try:
            import onnxruntime  # noqa: PLC0415
        except ImportError:
            raise PredictError("running an exported model needs onnxruntime: pip install 'avb-heads[export]'") \
                from None
        providers = ["CPUExecutionProvider"]
        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        if str(device).startswith("cuda"):
            if not has_cuda:
                raise PredictError(f"device {device!r}: this onnxruntime has no CUDA provider (install "
                                   "onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        elif str(device) == "auto":
            providers = ["CUDAExecutionProvider", *providers] if has_cuda else providers
        elif str(device) != "cpu":
            raise PredictError(f"device {device!r}: an exported model runs on cpu, cuda or auto")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3   # no graph-optimisation chatter on stderr
        self.session = onnxruntime.InferenceSession(str(folder.onnx_path), options, providers=providers)
        self.names = [out.name for out in self.session.get_outputs()]
        if self.names != list(folder.tasks.names):
            raise PredictError(f"{folder.onnx_path}: outputs {self.names} do not match the tasks of "
                               f"{folder.config_path} ({', '.join(folder.tasks.names)})")

    def __call__(self, waves: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session.run(None, {"waveform": waves, "attention_mask": mask})
        return {name: np.asarray(values, dtype=np.float64) for name, values in zip(self.names, out)}


# ---------------------------------------------------------------------------------------------- results

@dataclass
class Predictions:
    """Per input that was read, its name (the path as listed, or array_<k>) and per task [N, out_dim] float64
    (classification: probabilities). Window mode adds one entry per window (`window_*`, `input_of_window`)."""

    names: list[str]
    values: dict[str, np.ndarray]
    tasks: TaskSet
    skipped: list[str] = field(default_factory=list)   # one message per input skipped with skip_bad
    notes: list[str] = field(default_factory=list)     # said once per call (e.g. inputs shorter than the window)
    durations: np.ndarray | None = None                # window mode: seconds of each input
    window_values: dict[str, np.ndarray] | None = None
    window_spans: np.ndarray | None = None             # [M, 2] start_s, end_s
    input_of_window: np.ndarray | None = None          # [M] index into names

    def class_names(self, task: str, values: np.ndarray | None = None) -> list[str]:
        classes = self.tasks[task].classes
        values = self.values[task] if values is None else values
        return [classes[int(i)] for i in values.argmax(axis=1)]

    def columns(self) -> list[str]:
        """path, then per task its columns: a classification task's class column and p_<class> per class, a
        regression task's value columns (A-VB: Voc_Type, p_<type>, Two, High, Culture)."""
        columns = ["path"]
        for task in self.tasks:
            columns += [task.columns[0], *(f"p_{c}" for c in task.classes)] if task.is_classification \
                else list(task.columns)
        return columns

    def _rows(self, values: dict[str, np.ndarray], names: Sequence[str]) -> list[dict[str, Any]]:
        classes = {t.name: self.class_names(t.name, values[t.name]) for t in self.tasks if t.is_classification}
        rows = []
        for i, name in enumerate(names):
            row: dict[str, Any] = {"path": name}
            for task in self.tasks:
                if task.is_classification:
                    row[task.columns[0]] = classes[task.name][i]
                    row.update({f"p_{c}": float(v) for c, v in zip(task.classes, values[task.name][i])})
                else:
                    row.update({c: float(v) for c, v in zip(task.columns, values[task.name][i])})
            rows.append(row)
        return rows

    def records(self) -> list[dict[str, Any]]:
        """One dict per input, keyed by `columns()` (window mode: the mean over its windows)."""
        return self._rows(self.values, self.names)

    def window_records(self) -> list[dict[str, Any]]:
        """One dict per window: path, start_s, end_s, then the columns of `records()`."""
        if self.window_values is None:
            return []
        rows = self._rows(self.window_values, [self.names[i] for i in self.input_of_window])
        return [{"path": row.pop("path"), "start_s": float(start), "end_s": float(end), **row}
                for row, (start, end) in zip(rows, self.window_spans)]


# ---------------------------------------------------------------------------------------------- predictor

@dataclass
class _Piece:
    source: int          # index into the sources
    start_s: float
    end_s: float
    wave: np.ndarray     # float32, at most the clip/window length


class Predictor:
    """A loaded model and what it expects: its tasks and the clip length its heads were trained on."""

    def __init__(self, engine: Any, tasks: TaskSet, clip_seconds: float, source: str) -> None:
        self.engine = engine
        self.tasks = tasks
        self.clip_seconds = float(clip_seconds)
        self.source = source

    @classmethod
    def load(cls, source: str | os.PathLike, *, model: str | os.PathLike | None = None, device: Any = "cpu",
             progress: bool = False) -> Predictor:
        """An `avb export` folder (ONNX, no torch), or a run / ensemble dir with `model` = the backbone its cache
        was dumped from, or a fine-tuning output (its own backbone unless `model` is given).
        `device`: "cpu", "cuda", "cuda:N", "mps", "auto" or a torch.device (ONNX: cpu or cuda)."""
        if is_export_dir(source):
            if model is not None:
                raise PredictError(f"{source} is an exported model with its own backbone; leave --model out")
            folder = read_export(source)
            return cls(OnnxEngine(folder, str(device)), folder.tasks, folder.clip_seconds, str(source))
        from extract.backbone import hf_progress_bars  # noqa: PLC0415  (the PyTorch path: torch from here on)
        from extract.serve.loading import load_backbone_for, load_heads  # noqa: PLC0415
        from extract.serve.model import ServedModel  # noqa: PLC0415
        from heads.training.device import resolve_device  # noqa: PLC0415

        run_device = device if not isinstance(device, str) else resolve_device(device)
        heads = load_heads(source)
        with hf_progress_bars(progress):
            backbone, _ = load_backbone_for(heads, model)
        return cls(TorchEngine(ServedModel(backbone, heads), run_device), heads.tasks, heads.clip_seconds,
                   str(source))

    def predict(self, inputs: Any, *, window: float | None = None, hop: float | None = None, batch_size: int = 4,
                skip_bad: bool = False, progress: bool = False) -> Predictions:
        """Predict every input (paths, folders, arrays: see `as_sources`). `window` None: the first
        `clip_seconds` of each; else windows of `window` s every `hop` s (default: `window`, no overlap)."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        if batch_size < 1:
            raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
        if window is None and hop is not None:
            raise PredictError("--hop needs --window")
        if window is not None:
            hop = window if hop is None else hop
            window_samples(window, hop)   # the one-line errors for a bad --window / --hop
        sources = as_sources(inputs)
        length = _samples(self.clip_seconds if window is None else window, "--window")
        skipped: dict[int, str] = {}
        notes: list[str] = []
        durations = np.zeros(len(sources))
        bar = tqdm(total=len(sources), desc="predict", unit="file", disable=not progress)

        def pieces() -> Iterator[_Piece]:
            short = 0
            for k, source in enumerate(sources):
                try:
                    if window is None:
                        yield self._clip(k, source)
                    else:
                        durations[k] = _duration(source)
                        short += durations[k] * SAMPLE_RATE < length
                        for start, end, wave in _windows(source, window, hop):
                            yield _Piece(k, start, end, wave)
                except AudioError as err:   # one line naming the file
                    if not skip_bad:
                        raise PredictError(str(err)) from None
                    skipped[k] = str(err)
                bar.update(1)
            if short:
                notes.append(f"{short} input(s) shorter than the {window:g} s window: each is one window, "
                             "zero-padded (as a short clip is)")

        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.tasks.names}
        owners: list[int] = []
        spans: list[tuple[float, float]] = []
        for batch in _batched(pieces(), batch_size):
            waves = np.zeros((len(batch), length), dtype=np.float32)
            mask = np.zeros((len(batch), length), dtype=np.int64)
            for i, piece in enumerate(batch):
                waves[i], mask[i] = crop_or_pad(piece.wave, length)
            out = self.engine(waves, mask)
            for name in self.tasks.names:
                chunks[name].append(out[name])
            owners += [piece.source for piece in batch]
            spans += [(piece.start_s, piece.end_s) for piece in batch]
        bar.close()
        if window is not None and window != self.clip_seconds:
            notes.append(f"windows of {window:g} s; the heads were trained on {self.clip_seconds:g} s clips")

        kept = [k for k in range(len(sources)) if k not in skipped]
        if not kept:
            raise PredictError(f"none of the {len(sources)} input(s) could be read")
        owner = np.asarray(owners, dtype=np.int64)
        alive = ~np.isin(owner, list(skipped))      # a file that failed half-way loses the windows it gave
        values = {name: np.concatenate(parts)[alive] for name, parts in chunks.items()}
        owner = owner[alive]
        remap = {k: i for i, k in enumerate(kept)}
        preds = Predictions([sources[k].name for k in kept], values, self.tasks, list(skipped.values()), notes)
        if window is None:
            return preds
        index = np.array([remap[k] for k in owner], dtype=np.int64)
        preds.window_values, preds.window_spans, preds.input_of_window = values, np.asarray(spans)[alive], index
        preds.durations = durations[kept]
        counts = np.bincount(index, minlength=len(kept))[:, None]
        preds.values = {name: _sum_rows(v, index, len(kept)) / counts for name, v in values.items()}
        return preds

    def _clip(self, k: int, source: Source) -> _Piece:
        """The first clip_seconds of an input (the whole input is decoded: refused beyond MAX_SECONDS)."""
        if source.wave is not None:
            wave = source.wave
        else:
            seconds = audio_info(source.path).duration_s
            if seconds > MAX_SECONDS:
                raise AudioError(f"{source.path}: {seconds:.1f} s long; whole-clip prediction reads recordings "
                                   f"up to {MAX_SECONDS:g} s (the first {self.clip_seconds:g} s of each); use "
                                   f"--window {self.clip_seconds:g} --hop {self.clip_seconds / 2:g} for long "
                                   "recordings")
            wave = load_audio(source.path)
        n = min(len(wave), _samples(self.clip_seconds, "clip"))
        return _Piece(k, 0.0, n / SAMPLE_RATE, wave[:n])


def _sum_rows(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """[n, dim]: row i is the sum of the rows of `values` whose index is i (each input's windows)."""
    out = np.zeros((n, values.shape[1]), dtype=np.float64)
    np.add.at(out, index, values)
    return out


def _samples(seconds: float, what: str) -> int:
    n = int(round(float(seconds) * SAMPLE_RATE))
    if n < 1:
        raise PredictError(f"{what} must be positive, got {seconds}")
    return n


def _duration(source: Source) -> float:
    if source.wave is not None:
        return len(source.wave) / SAMPLE_RATE
    return audio_info(source.path).duration_s


def _windows(source: Source, window: float, hop: float) -> Iterator[tuple[float, float, np.ndarray]]:
    """(start_s, end_s, wave) of every window of an input: a file read block by block, an array sliced."""
    if source.path is not None:
        for w in audio_windows(source.path, window, hop):
            yield w.start_s, w.end_s, w.wave
        return
    n_window, n_hop = window_samples(window, hop)
    for start in window_starts(len(source.wave), n_window, n_hop):
        wave = source.wave[start:start + n_window]
        yield start / SAMPLE_RATE, (start + len(wave)) / SAMPLE_RATE, wave


def _batched(items: Iterable[_Piece], size: int) -> Iterator[list[_Piece]]:
    batch: list[_Piece] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
