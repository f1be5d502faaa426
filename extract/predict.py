"""`avb predict`: the four tasks for new audio files, from a backbone and a trained run or ensemble.

    avb predict --model DIR --heads RUN_OR_ENSEMBLE --out FILE.csv AUDIO...

The heads were trained on features of one backbone, clip length and layer set, recorded in each run's
`config.json` (`cache_attrs`). A head applied to another backbone's features produces numbers that look
fine and mean nothing, so the backbone given here is checked against that record first (layer names,
widths and the architecture fields of its config) and a mismatch is refused.

New audio goes through exactly the dump's path -- `load_wav` (any rate, any channel count) -> the first
`clip_seconds` window, zero-padded with a mask -> `forward_layers` in eval mode -> masked-mean pooled layers
-- so a corpus clip gets the prediction the head gives its cached features (up to the cache's float16
rounding, which is not replayed here: the head sees the float32 features).

An ensemble dir (`members.json` from `avb ensemble`) is applied as the ensemble was built: per task the
weighted average of its members (TYPE: of class probabilities, then arg-max).

A fine-tuning output (`avb finetune`'s OUT, recognised by its config.json marker) is applied end to end: its
own head on its own fine-tuned backbone (`--model` defaults to OUT/backbone; another `--model` must hold the
same weights), through the same path as fine-tuning's validation -- no cache involved.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command import command_errors
from heads.runs import (
    BACKBONE_DIR, CONFIG_FILE, HEAD_FILE, is_finetune_dir, read_finetune_config, read_json_object, read_run_config,
)
from heads.tasks import CULTURE, HIGH, TASK_NAMES, TASKS, TWO, TYPE

DEFAULT_CLIP_SECONDS = 2.5
# Config fields that define what a backbone's layers compute; two configs that differ here give features a
# head trained on one cannot use. Fields absent from both configs are skipped (HuBERT/WavLM variants).
ARCH_KEYS: tuple[str, ...] = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "layer_norm_eps",
)


class PredictError(ValueError):
    """Inputs `avb predict` cannot use; one line naming the file, run or value at fault."""


def csv_columns() -> list[str]:
    """The output header: path, Voc_Type, p_<class> per TYPE class, then Two, High and Culture columns."""
    return (["path", TYPE.columns[0]] + [f"p_{c}" for c in TYPE.classes]
            + list(TWO.columns) + list(HIGH.columns) + list(CULTURE.columns))


# ------------------------------------------------------------------------------------------------ heads

@dataclass
class LoadedRun:
    """One trained run ready to apply: its head (eval mode, R = 1) and what it expects of the features."""

    path: Path
    head: Any                       # heads.models.MultiTaskHead
    cache_attrs: dict[str, Any]
    frame_stride: int = 1           # only for frame-mode BRANCH

    @property
    def layers(self) -> list[str]:
        return list(self.head.required_layers)

    @property
    def frame_layers(self) -> list[str]:
        return list(getattr(self.head, "required_frame_layers", []))


@dataclass
class HeadSet:
    """The runs to apply and, per task, which of them to average with which weight."""

    runs: list[LoadedRun]
    members: dict[str, list[tuple[int, float]]]   # task -> [(index into runs, weight)]
    source: Path
    is_ensemble: bool = False
    backbone_dir: Path | None = None              # a fine-tuning output's own backbone (None: heads from a cache)

    @property
    def clip_seconds(self) -> float:
        return float(self.runs[0].cache_attrs.get("clip_seconds", DEFAULT_CLIP_SECONDS))

    @property
    def layers(self) -> list[str]:
        return sorted({layer for run in self.runs for layer in run.layers})

    @property
    def frame_layers(self) -> list[str]:
        return sorted({layer for run in self.runs for layer in run.frame_layers})

    @property
    def frame_stride(self) -> int:
        strides = {run.frame_stride for run in self.runs if run.frame_layers}
        if len(strides) > 1:
            raise PredictError(f"{self.source}: frame-mode members use different frame strides {sorted(strides)}")
        return strides.pop() if strides else 1


def _frame_stride(run_dir: Path, config: dict[str, Any]) -> int:
    """Frame stride of the cache a frame-mode run was trained on; run configs do not record it, the cache does."""
    from cache.reader import CacheError, read_attrs  # noqa: PLC0415

    cache = config.get("cache")
    if not cache:
        raise PredictError(f"run {run_dir} attends over frames, and its config.json names no cache to read the "
                           "frame stride from")
    try:
        return int(read_attrs(cache)["frame_stride"])
    except CacheError as err:
        raise PredictError(f"run {run_dir} attends over frames and needs its cache's frame stride: {err}") from None


def _load_head_weights(head: Any, weights: Path, config_path: Path) -> None:
    """Load a one-run state (`run_state_dict` / a fine-tuned head's state_dict) into run 0 of `head`."""
    from safetensors.torch import load_file  # noqa: PLC0415

    if not weights.is_file():
        raise PredictError(f"{weights}: no such file (the run is incomplete or was not trained here)")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise PredictError(f"{weights}: not a readable safetensors file ({err})") from None
    try:
        head.load_run_state_dict(0, state)
    except ValueError as err:
        raise PredictError(f"{weights}: does not fit the head in {config_path} ({err})") from None
    head.eval()
    head.requires_grad_(False)


def load_finetune_head(ft_dir: str | os.PathLike) -> LoadedRun:
    """The head a fine-tuning run trained end to end with its backbone, and what it expects of the features.

    Its "cache attributes" are made from the run itself: the layers and widths it recorded, its clip length,
    and the architecture fields of its own backbone's config (so another `--model` architecture is refused).
    """
    from heads.models import HeadConfig, build_head  # noqa: PLC0415

    ft_dir = Path(ft_dir)
    config = read_finetune_config(ft_dir)
    dims = config.get("layer_dims")
    if not isinstance(dims, dict) or not isinstance(config.get("head"), dict):
        raise PredictError(f"{ft_dir / CONFIG_FILE}: no head or layer_dims recorded")
    backbone_config = read_json_object(ft_dir / BACKBONE_DIR / CONFIG_FILE)
    try:
        head = build_head(HeadConfig(**config["head"]), {k: int(v) for k, v in dims.items()},
                          [int(config.get("seed", 0))])
    except (ValueError, TypeError) as err:
        raise PredictError(f"{ft_dir / CONFIG_FILE}: {err}") from None
    _load_head_weights(head, ft_dir / HEAD_FILE, ft_dir / CONFIG_FILE)
    attrs = {"layers": list(dims), "layer_dims": dims,
             "clip_seconds": float(config.get("clip_seconds", DEFAULT_CLIP_SECONDS)),
             "backbone": {"name_or_path": str(ft_dir / BACKBONE_DIR), "config": backbone_config}}
    return LoadedRun(ft_dir, head, attrs)


def load_run_head(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild a run's head from config.json and head.safetensors (the best epoch's weights)."""
    from heads.models import build_head  # noqa: PLC0415
    from heads.train import TrainConfig  # noqa: PLC0415

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    attrs = config.get("cache_attrs")
    if not isinstance(attrs, dict) or not isinstance(attrs.get("layer_dims"), dict):
        raise PredictError(f"{run_dir / CONFIG_FILE}: no cache_attrs.layer_dims recorded, so the features this "
                           "run expects are unknown")
    fields = {k: v for k, v in config.items() if k not in ("run_format", "cache", "cache_attrs")}
    try:
        train_cfg = TrainConfig.from_dict(fields)
        head = build_head(train_cfg.head, {k: int(v) for k, v in attrs["layer_dims"].items()}, [train_cfg.seed])
    except (ValueError, TypeError) as err:
        raise PredictError(f"{run_dir / CONFIG_FILE}: {err}") from None
    _load_head_weights(head, run_dir / HEAD_FILE, run_dir / CONFIG_FILE)
    run = LoadedRun(run_dir, head, attrs)
    if run.frame_layers:
        run.frame_stride = _frame_stride(run_dir, config)
    return run


def _resolve_member(path_text: str, ensemble_dir: Path) -> Path:
    """A member path from members.json: absolute, or relative to the working dir it was built from (tried
    first) or to the ensemble dir / its parent (an ensemble moved together with its runs)."""
    path = Path(path_text)
    candidates = [path] if path.is_absolute() else [path, ensemble_dir / path, ensemble_dir.parent / path]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise PredictError(f"{ensemble_dir / 'members.json'}: member run {path_text} not found "
                       f"(looked in {', '.join(str(c) for c in candidates)})")


def load_heads(source: str | os.PathLike) -> HeadSet:
    """A run dir (config.json + head.safetensors), an ensemble dir (members.json) or a fine-tuning output
    (avb finetune's OUT) -> the heads to apply."""
    source = Path(source)
    if not source.is_dir():
        raise PredictError(f"--heads {source}: not a directory (give a run dir, an ensemble dir or a fine-tuning "
                           "output)")
    if is_finetune_dir(source):
        heads = HeadSet([load_finetune_head(source)], {name: [(0, 1.0)] for name in TASK_NAMES}, source,
                        backbone_dir=source / BACKBONE_DIR)
    elif (source / "members.json").is_file():
        members_json = read_json_object(source / "members.json")
        tasks = members_json.get("tasks")
        if not isinstance(tasks, dict) or sorted(tasks) != sorted(TASK_NAMES):
            raise PredictError(f"{source / 'members.json'}: 'tasks' must map each of {', '.join(TASK_NAMES)} "
                               "to its members")
        runs: list[LoadedRun] = []
        index: dict[Path, int] = {}
        members: dict[str, list[tuple[int, float]]] = {}
        for name in TASK_NAMES:
            chosen = []
            for entry in tasks[name]:
                if not isinstance(entry, dict) or "run" not in entry or "weight" not in entry:
                    raise PredictError(f"{source / 'members.json'}: task {name} has a member without run/weight")
                path = _resolve_member(str(entry["run"]), source).resolve()
                if path not in index:
                    index[path] = len(runs)
                    runs.append(load_run_head(path))
                chosen.append((index[path], float(entry["weight"])))
            total = sum(w for _, w in chosen)
            if not chosen or not total > 0:
                raise PredictError(f"{source / 'members.json'}: task {name} has no members with positive weight")
            members[name] = [(i, w / total) for i, w in chosen]
        heads = HeadSet(runs, members, source, is_ensemble=True)
    elif (source / "config.json").is_file():
        heads = HeadSet([load_run_head(source)], {name: [(0, 1.0)] for name in TASK_NAMES}, source)
    else:
        raise PredictError(f"--heads {source}: neither a run dir (config.json + head.safetensors), an "
                           "ensemble dir (members.json) nor a fine-tuning output (config.json + backbone/)")
    clips = {float(run.cache_attrs.get("clip_seconds", DEFAULT_CLIP_SECONDS)) for run in heads.runs}
    if len(clips) > 1:
        raise PredictError(f"{source}: members were trained on different clip lengths {sorted(clips)}")
    return heads


# --------------------------------------------------------------------------------------------- backbone

def _layers_text(layers: Sequence[str]) -> str:
    return ",".join(layers) if len(layers) <= 4 else f"{layers[0]},{layers[1]},...,{layers[-1]} ({len(layers)})"


def check_backbone(run: LoadedRun, model: Any, model_name: str) -> None:
    """Refuse a backbone whose layers, widths or architecture differ from the ones the run's cache recorded."""
    from extract.backbone import layer_dims, layer_names  # noqa: PLC0415

    attrs = run.cache_attrs
    where = f"run {run.path} was trained on features of a different backbone than --model {model_name}"
    names, dims = layer_names(model), layer_dims(model)
    recorded = attrs.get("layers")
    if recorded is not None and list(recorded) != names:
        raise PredictError(f"{where}: its cache has layers {_layers_text(list(recorded))}, the model gives "
                           f"{_layers_text(names)}")
    for layer, width in attrs["layer_dims"].items():
        if layer not in dims:
            raise PredictError(f"{where}: its cache has layer {layer}, the model has no such layer")
        if int(width) != dims[layer]:
            raise PredictError(f"{where}: layer {layer} is {width}-d in its cache and {dims[layer]}-d in the model")
    backbone = attrs.get("backbone")
    recorded_cfg = backbone.get("config") if isinstance(backbone, dict) else None
    if isinstance(recorded_cfg, dict):
        current = json.loads(model.config.to_json_string(use_diff=False))
        for key in ARCH_KEYS:
            if key not in recorded_cfg and key not in current:
                continue
            a, b = recorded_cfg.get(key), current.get(key)
            if json.dumps(a) != json.dumps(b):
                raise PredictError(f"{where}: config field {key} is {a!r} in its cache and {b!r} in the model")


# ------------------------------------------------------------------------------------------------ audio

def find_audio(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their *.wav files (recursively, sorted); order kept, duplicates dropped."""
    out: list[Path] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.suffix.lower() == ".wav" and p.is_file()),
                           key=lambda p: p.relative_to(path).as_posix())
            if not found:
                raise PredictError(f"{path}: folder holds no .wav files")
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


# ---------------------------------------------------------------------------------------------- predict

@dataclass
class Predictions:
    """Per file that was read: the path as listed, and per task [N, out_dim] (TYPE: class probabilities)."""

    paths: list[Path]
    values: dict[str, np.ndarray]
    skipped: list[str] = field(default_factory=list)   # one message per file skipped with --skip-bad

    def type_names(self) -> list[str]:
        return [TYPE.classes[int(i)] for i in self.values["type"].argmax(axis=1)]


def apply_heads(heads: HeadSet, pooled: dict[str, Any], frames: dict[str, Any] | None = None,
                frame_mask: Any = None) -> dict[str, np.ndarray]:
    """Eval-mode outputs of every run on one batch, blended per task: task -> [B, out_dim] float64."""
    import torch  # noqa: PLC0415

    from heads.ensemble import blend  # noqa: PLC0415
    from heads.models import HeadInputs  # noqa: PLC0415

    per_run = []
    with torch.no_grad():
        for run in heads.runs:
            inputs = HeadInputs(
                pooled={k: pooled[k][None].float() for k in run.layers},
                frames={k: frames[k][None].float() for k in run.frame_layers} if run.frame_layers else None,
                frame_mask=frame_mask[None] if run.frame_layers else None,
            )
            out = run.head(inputs)
            per_run.append({
                name: (torch.softmax(out[name][0].float(), -1) if TASKS[name].is_classification
                       else out[name][0].float()).double().numpy()
                for name in TASK_NAMES
            })
    return blend(per_run, heads.members)


def _pad_frames(frames: dict[str, list[Any]]) -> tuple[dict[str, Any], Any]:
    """Ragged per-clip frames -> zero-padded [B, T, D] per layer and the [B, T] valid mask."""
    import torch  # noqa: PLC0415

    first = next(iter(frames.values()))
    lengths = torch.tensor([len(x) for x in first])
    t_max = max(1, int(lengths.max()))
    padded = {}
    for layer, clips in frames.items():
        arr = torch.zeros(len(clips), t_max, clips[0].shape[-1])
        for i, clip in enumerate(clips):
            arr[i, :len(clip)] = clip
        padded[layer] = arr
    return padded, torch.arange(t_max)[None, :] < lengths[:, None]


def _weight_files(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every weights file of a save_pretrained folder."""
    import hashlib  # noqa: PLC0415

    out = {}
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def check_finetuned_backbone(heads: HeadSet, model_name: str) -> None:
    """A fine-tuned head only fits the backbone it was trained with: --model must be that folder or a copy."""
    own = heads.backbone_dir
    given = Path(model_name)
    if own is None or (given.is_dir() and given.resolve() == own.resolve()):
        return
    if not given.is_dir() or _weight_files(given) != _weight_files(own):
        raise PredictError(f"--model {model_name} is not the backbone fine-tuned together with the head of "
                           f"{heads.source} (its weights differ from {own}); use --model {own} or leave --model out")


def predict_files(
    model_name: str | os.PathLike | None,
    heads_dir: str | os.PathLike,
    audio: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    skip_bad: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> Predictions:
    """Load the heads and the backbone, check they belong together, and predict every audio file.

    `model_name` None: the fine-tuning output's own backbone (an error for heads trained on a cache).
    """
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from extract.audio import crop_or_pad, load_wav  # noqa: PLC0415
    from extract.backbone import forward_layers, load_backbone  # noqa: PLC0415
    from extract.clips import clip_samples  # noqa: PLC0415
    from heads.device import resolve_device  # noqa: PLC0415

    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)   # a machine without the device fails before anything loads
    files = find_audio(audio)
    heads = load_heads(heads_dir)
    if model_name is None:
        if heads.backbone_dir is None:
            raise PredictError(f"--model is needed: the heads in {heads_dir} were trained on cached features; give "
                               "the backbone the cache was dumped from")
        model_name = heads.backbone_dir
    check_finetuned_backbone(heads, str(model_name))
    model = load_backbone(model_name)
    for run in heads.runs:
        check_backbone(run, model, str(model_name))
    model.to(device).eval()
    for run in heads.runs:
        run.head.to(device)
    n_samples = clip_samples(heads.clip_seconds)
    frame_layers, stride = heads.frame_layers, heads.frame_stride

    kept: list[Path] = []
    skipped: list[str] = []
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in TASK_NAMES}
    bar = tqdm(total=len(files), desc="predict", unit="file", disable=not progress)
    for start in range(0, len(files), batch_size):
        waves, masks, batch_paths = [], [], []
        for path in files[start:start + batch_size]:
            try:
                wave = load_wav(path)
            except ValueError as err:  # AudioError: one line naming the file
                if not skip_bad:
                    raise PredictError(str(err)) from None
                skipped.append(str(err))
                click.echo(f"Warning: skipping {err}", err=True)
                continue
            clip, mask = crop_or_pad(wave, n_samples)
            waves.append(torch.from_numpy(clip))
            masks.append(torch.from_numpy(mask))
            batch_paths.append(path)
        bar.update(len(files[start:start + batch_size]))
        if not batch_paths:
            continue
        with torch.inference_mode():
            pooled, _, frames = forward_layers(model, torch.stack(waves).to(device), torch.stack(masks).to(device),
                                               frame_layers=frame_layers, frame_stride=stride)
            padded, frame_mask = _pad_frames(frames) if frame_layers else (None, None)
            if padded is not None:
                padded = {k: v.to(device) for k, v in padded.items()}
                frame_mask = frame_mask.to(device)
            out = apply_heads(heads, pooled, padded, frame_mask)
        for name in TASK_NAMES:
            chunks[name].append(out[name])
        kept.extend(batch_paths)
    bar.close()
    if not kept:
        raise PredictError(f"none of the {len(files)} audio file(s) could be read")
    return Predictions(kept, {name: np.concatenate(parts) for name, parts in chunks.items()}, skipped)


def _fmt(value: float) -> str:
    return f"{float(value):.9g}"


def predictions_csv(preds: Predictions) -> str:
    """The CSV text: one row per file in the order read, columns as `csv_columns()`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_columns())
    names = preds.type_names()
    for i, path in enumerate(preds.paths):
        row = [str(path), names[i]] + [_fmt(v) for v in preds.values["type"][i]]
        for name in ("two", "high", "culture"):
            row += [_fmt(v) for v in preds.values[name][i]]
        writer.writerow(row)
    return buf.getvalue()


def write_predictions(path: str | os.PathLike, preds: Predictions) -> Path:
    from cache.atomic import write_text_atomic  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise PredictError(f"--out {path} is a directory; give the .csv file to write")
    write_text_atomic(path, predictions_csv(preds))
    return path


@click.command("predict")
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model", default=None,
              help="The backbone the heads' cache was dumped from (avb finetune's OUT/backbone, or a checkpoint). "
                   "Optional when --heads is a fine-tuning output: its own OUT/backbone.")
@click.option("--heads", "heads_dir", required=True, type=click.Path(path_type=Path),
              help="A run dir (config.json + head.safetensors), an ensemble dir (members.json), or a fine-tuning "
                   "output (avb finetune's OUT: its own head on its own backbone, no cache needed).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The CSV file to write.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Clips per backbone forward pass.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable audio files with a warning instead of stopping.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict_command(audio: tuple[Path, ...], model: str | None, heads_dir: Path, out: Path, batch_size: int,
                    skip_bad: bool, device: str | None, quiet: bool) -> None:
    """Predict type, valence/arousal, 10 emotions and 40 culture-specific emotions for AUDIO (wav files or
    folders searched recursively for *.wav). One CSV row per file: path, Voc_Type, p_<class>, then the
    Two, High and Culture columns."""
    from extract.backbone import hf_progress_bars  # noqa: PLC0415  (imports torch: only when the command runs)

    with command_errors():  # PredictError, AudioError, BackboneLoadError, HeadConfigError, write errors, signals
        with hf_progress_bars(not quiet):
            preds = predict_files(model, heads_dir, audio, batch_size=batch_size, skip_bad=skip_bad,
                                  device=device, progress=not quiet)
        write_predictions(out, preds)
    extra = f", skipped {len(preds.skipped)} unreadable" if preds.skipped else ""
    click.echo(f"wrote {out} ({len(preds.paths)} file{'s' if len(preds.paths) != 1 else ''}{extra})")
