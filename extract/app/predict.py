"""`avb predict`: the tasks of a trained model for new audio files, from a backbone and a trained run or ensemble.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.options import progress_option
from heads.names import CLIP_SECONDS
from heads.runs import (
    BACKBONE_DIR,
    CONFIG_FILE,
    ENSEMBLE,
    FINETUNE,
    HEAD_FILE,
    MEMBERS_FILE,
    RUN,
    output_kind,
    read_ensemble,
    read_finetune_config,
    read_json_object,
    read_run_config,
)
from heads.submission import number_text
from heads.tasks import TaskSet, tasks_of

# Config fields that define what a backbone's layers compute; two configs that differ here give features a
# head trained on one cannot use. Fields absent from both configs are skipped (HuBERT/WavLM variants).
ARCH_KEYS: tuple[str, ...] = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "layer_norm_eps",
)


class PredictError(AvbError):
    """Inputs `avb predict` cannot use; one line naming the file, run or value at fault."""


def csv_columns(tasks: TaskSet) -> list[str]:
    """The output header: path, then per task in order its columns: a classification task's class column and
    p_<class> per class, a regression task's value columns (A-VB: Voc_Type, p_<type>, Two, High, Culture)."""
    columns = ["path"]
    for task in tasks:
        columns += [task.columns[0], *(f"p_{c}" for c in task.classes)] if task.is_classification else task.columns
    return columns


# ------------------------------------------------------------------------------------------------ heads

@dataclass
class LoadedRun:
    """One trained run ready to apply: its head (eval mode, R = 1) and what it expects of the features."""

    path: Path
    head: Any                       # heads.model.architectures.MultiTaskHead
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
    def tasks(self) -> TaskSet:
        return self.runs[0].head.tasks

    @property
    def clip_seconds(self) -> float:
        return float(self.runs[0].cache_attrs.get("clip_seconds", CLIP_SECONDS))

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
        raise PredictError(f"run {run_dir} attends over frames, and its {CONFIG_FILE} names no cache to read the "
                           "frame stride from")
    try:
        return int(read_attrs(cache)["frame_stride"])
    except CacheError as err:
        raise PredictError(f"run {run_dir} attends over frames and needs its cache's frame stride: {err}") from None


def _load_head_weights(head: Any, weights: Path, config_path: Path) -> None:
    """Load a one-run state (`run_state_dict` / a fine-tuned head's state_dict) into run 0 of `head`."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from heads.model.architectures import HeadConfigError  # noqa: PLC0415

    if not weights.is_file():
        raise PredictError(f"{weights}: no such file (the run is incomplete or was not trained here)")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise PredictError(f"{weights}: not a readable safetensors file ({err})") from None
    try:
        head.load_run_state_dict(0, state)
    except HeadConfigError as err:
        raise PredictError(f"{weights}: does not fit the head in {config_path} ({err})") from None
    head.eval()
    head.requires_grad_(False)


def load_finetune_head(ft_dir: str | os.PathLike) -> LoadedRun:
    """The head a fine-tuning run trained end to end with its backbone, and what it expects of the features.

    Its "cache attributes" are made from the run itself: the layers and widths it recorded, its clip length,
    and the architecture fields of its own backbone's config (so another `--model` architecture is refused).
    """
    from heads.model.architectures import HeadConfig, build_head  # noqa: PLC0415

    ft_dir = Path(ft_dir)
    config = read_finetune_config(ft_dir)
    dims = config.get("layer_dims")
    if not isinstance(dims, dict) or not isinstance(config.get("head"), dict):
        raise PredictError(f"{ft_dir / CONFIG_FILE}: no head or layer_dims recorded")
    backbone_config = read_json_object(ft_dir / BACKBONE_DIR / CONFIG_FILE)
    try:
        tasks = tasks_of(config, str(ft_dir / CONFIG_FILE))
        head = build_head(HeadConfig(**config["head"]), {k: int(v) for k, v in dims.items()},
                          [int(config.get("seed", 0))], tasks)
    except (AvbError, TypeError) as err:   # TypeError: an unknown or missing HeadConfig field
        raise PredictError(f"{ft_dir / CONFIG_FILE}: {err}") from None
    _load_head_weights(head, ft_dir / HEAD_FILE, ft_dir / CONFIG_FILE)
    attrs = {"layers": list(dims), "layer_dims": dims, "tasks": tasks.to_json(),
             "clip_seconds": float(config.get("clip_seconds", CLIP_SECONDS)),
             "backbone": {"name_or_path": str(ft_dir / BACKBONE_DIR), "config": backbone_config}}
    return LoadedRun(ft_dir, head, attrs)


def load_run_head(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild a run's head from config.json and head.safetensors (the best epoch's weights)."""
    from heads.model.architectures import build_head  # noqa: PLC0415
    from heads.training.joint import TrainConfig  # noqa: PLC0415

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    attrs = config.get("cache_attrs")
    if not isinstance(attrs, dict) or not isinstance(attrs.get("layer_dims"), dict):
        raise PredictError(f"{run_dir / CONFIG_FILE}: no cache_attrs.layer_dims recorded, so the features this "
                           "run expects are unknown")
    fields = {k: v for k, v in config.items() if k not in ("run_format", "cache", "cache_attrs", "cv_round")}
    try:
        train_cfg = TrainConfig.from_dict(fields)
        head = build_head(train_cfg.head, {k: int(v) for k, v in attrs["layer_dims"].items()}, [train_cfg.seed],
                          tasks_of(attrs, str(run_dir / CONFIG_FILE)))
    except (AvbError, TypeError) as err:   # TypeError: an unknown or missing HeadConfig field
        raise PredictError(f"{run_dir / CONFIG_FILE}: {err}") from None
    _load_head_weights(head, run_dir / HEAD_FILE, run_dir / CONFIG_FILE)
    run = LoadedRun(run_dir, head, attrs)
    if run.frame_layers:
        run.frame_stride = _frame_stride(run_dir, config)
    return run


def load_ensemble_heads(source: Path) -> HeadSet:
    """An ensemble dir: each member run loaded once, and per task its members' weights normalised to sum 1."""
    ensemble = read_ensemble(source)
    runs: list[LoadedRun] = []
    index: dict[Path, int] = {}
    members: dict[str, list[tuple[int, float]]] = {}
    for name, chosen in ensemble.members.items():
        picked = []
        for run, weight in chosen:
            path = ensemble.member_dir(run).resolve()
            if path not in index:
                index[path] = len(runs)
                runs.append(load_run_head(path))
            picked.append((index[path], weight))
        total = sum(w for _, w in picked)
        members[name] = [(i, w / total) for i, w in picked]
    tasks = runs[0].head.tasks
    for run in runs[1:]:
        if run.head.tasks != tasks:
            raise PredictError(f"{source}: member {run.path} predicts {', '.join(run.head.tasks.names)}, another "
                               f"member {', '.join(tasks.names)}")
    if sorted(members) != sorted(tasks.names):
        raise PredictError(f"{source / MEMBERS_FILE}: members are given for {', '.join(members)}; the runs predict "
                           f"{', '.join(tasks.names)}")
    return HeadSet(runs, members, source, is_ensemble=True)


def load_heads(source: str | os.PathLike) -> HeadSet:
    """A run dir (config.json + head.safetensors), an ensemble dir (members.json) or a fine-tuning output
    (avb finetune's OUT) -> the heads to apply."""
    source = Path(source)
    if not source.is_dir():
        raise PredictError(f"--heads {source}: not a directory (give a run dir, an ensemble dir or a fine-tuning "
                           "output)")
    kind = output_kind(source)
    if kind == FINETUNE:
        run = load_finetune_head(source)
        heads = HeadSet([run], {name: [(0, 1.0)] for name in run.head.tasks.names}, source,
                        backbone_dir=source / BACKBONE_DIR)
    elif kind == ENSEMBLE:
        heads = load_ensemble_heads(source)
    elif kind == RUN or (source / CONFIG_FILE).is_file():   # an incomplete run: load_run_head says what is wrong
        run = load_run_head(source)
        heads = HeadSet([run], {name: [(0, 1.0)] for name in run.head.tasks.names}, source)
    else:
        raise PredictError(f"--heads {source}: neither a run dir ({CONFIG_FILE} + {HEAD_FILE}), an ensemble dir "
                           f"({MEMBERS_FILE}) nor a fine-tuning output ({CONFIG_FILE} + {BACKBONE_DIR}/)")
    clips = {float(run.cache_attrs.get("clip_seconds", CLIP_SECONDS)) for run in heads.runs}
    if len(clips) > 1:
        raise PredictError(f"{source}: members were trained on different clip lengths {sorted(clips)}")
    return heads


# --------------------------------------------------------------------------------------------- backbone

def _layers_text(layers: Sequence[str]) -> str:
    return ",".join(layers) if len(layers) <= 4 else f"{layers[0]},{layers[1]},...,{layers[-1]} ({len(layers)})"


def backbone_identity(layers: Sequence[str] | None, layer_dims: dict[str, Any], config: dict[str, Any] | None,
                      arch_keys: Sequence[str]) -> dict[str, Any]:
    """What decides whether two backbones give the same features, in the shape of the cache attributes
    (`cache.reader.compat_attrs`): layer names, their widths and the `arch_keys` of the backbone's config.
    Built the same way for the recorded side and the model side, and compared by `check_compatible`."""
    out: dict[str, Any] = {}
    if layers is not None:
        out["layers"] = list(layers)
    out["layer_dims"] = {layer: int(width) for layer, width in layer_dims.items()}
    if config is not None:
        out["backbone"] = {"config": {key: config.get(key) for key in arch_keys}}
    return out


def check_backbone(run: LoadedRun, model: Any, model_name: str) -> None:
    """Refuse a backbone whose layers, widths or architecture differ from the ones the run's cache recorded."""
    from cache.reader import IncompatibleCache, check_compatible  # noqa: PLC0415
    from extract.backbone import layer_dims, layer_names  # noqa: PLC0415

    attrs = run.cache_attrs
    backbone = attrs.get("backbone")
    recorded_cfg = backbone.get("config") if isinstance(backbone, dict) else None
    recorded_cfg = recorded_cfg if isinstance(recorded_cfg, dict) else None
    current = json.loads(model.config.to_json_string(use_diff=False))
    keys = [k for k in ARCH_KEYS if recorded_cfg is not None and (k in recorded_cfg or k in current)]
    expected = backbone_identity(attrs.get("layers"), attrs["layer_dims"], recorded_cfg, keys)
    actual = backbone_identity(layer_names(model), layer_dims(model), current, keys)
    try:
        check_compatible(actual, expected, source=model_name)
    except IncompatibleCache as err:
        where = f"run {run.path} was trained on features of a different backbone than --model {model_name}"
        raise PredictError(f"{where}: {_backbone_difference(err, expected, actual)}") from None


def _backbone_difference(err: Any, expected: dict[str, Any], actual: dict[str, Any]) -> str:
    """`check_compatible`'s difference between the run's record and the model, in the words of this check."""
    if err.key == "layers":
        return (f"its cache has layers {_layers_text(expected['layers'])}, the model gives "
                f"{_layers_text(actual['layers'])}")
    if err.key == "layer_dims":
        layer = err.path[1]
        if layer not in actual["layer_dims"]:
            return f"its cache has layer {layer}, the model has no such layer"
        if layer not in expected["layer_dims"]:
            return f"the model has layer {layer}, its cache has no such layer"
        return f"layer {layer} is {expected['layer_dims'][layer]}-d in its cache and {actual['layer_dims'][layer]}-d " \
               "in the model"
    field = err.path[2]
    a, b = expected["backbone"]["config"][field], actual["backbone"]["config"][field]
    return f"config field {field} is {a!r} in its cache and {b!r} in the model"


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
    """Per file that was read: the path as listed, and per task [N, out_dim] (classification: probabilities)."""

    paths: list[Path]
    values: dict[str, np.ndarray]
    tasks: TaskSet
    skipped: list[str] = field(default_factory=list)   # one message per file skipped with --skip-bad

    def class_names(self, task: str) -> list[str]:
        classes = self.tasks[task].classes
        return [classes[int(i)] for i in self.values[task].argmax(axis=1)]


def apply_heads(heads: HeadSet, pooled: dict[str, Any], frames: dict[str, Any] | None = None,
                frame_mask: Any = None) -> dict[str, np.ndarray]:
    """Eval-mode outputs of every run on one batch, blended per task: task -> [B, out_dim] float64."""
    import torch  # noqa: PLC0415

    from heads.analysis.ensemble import blend  # noqa: PLC0415
    from heads.model.architectures import HeadInputs  # noqa: PLC0415

    per_run = []
    with torch.no_grad():
        for run in heads.runs:
            inputs = HeadInputs(
                pooled={k: pooled[k][None].float() for k in run.layers},
                frames={k: frames[k][None].float() for k in run.frame_layers} if run.frame_layers else None,
                frame_mask=frame_mask[None] if run.frame_layers else None,
            )
            out = run.head.predict(inputs)
            per_run.append({name: out[name][0].double().numpy() for name in run.head.tasks.names})
    return blend(per_run, heads.members)


@dataclass
class _AudioFiles:
    """Audio files as the corpus `ClipDataset` reads: clip id k is the k-th file, and there are no labels."""

    files: list[Path]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = [str(k) for k in range(len(self.files))]

    def audio_path(self, clip_id: str) -> Path:
        return self.files[int(clip_id)]


def clip_batches(files: Sequence[Path], clip_seconds: float, batch_size: int, *, skip_bad: bool,
                 skipped: list[str]) -> Iterator[tuple[int, list[Path], dict[str, Any]]]:
    """The files as the dump reads a corpus (`ClipDataset`: the first `clip_seconds` window, zero-padded with a
    mask; `collate_clips`), `batch_size` files at a time: (files tried, the files read, their batch). An
    unreadable file stops with its one-line error, or with `skip_bad` is left out, its message in `skipped`."""
    from extract.audio import AudioError  # noqa: PLC0415
    from extract.clips import ClipDataset, collate_clips  # noqa: PLC0415

    dataset = ClipDataset(_AudioFiles(list(files)), np.arange(len(files)), clip_seconds=clip_seconds, train=False)
    for start in range(0, len(files), batch_size):
        items, paths = [], []
        stop = min(start + batch_size, len(files))
        for k in range(start, stop):
            try:
                items.append(dataset[k])
            except AudioError as err:   # one line naming the file
                if not skip_bad:
                    raise PredictError(str(err)) from None
                skipped.append(str(err))
                click.echo(f"Warning: skipping {err}", err=True)
                continue
            paths.append(files[k])
        yield stop - start, paths, (collate_clips(items) if items else {})


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
    device: Any = None,
    progress: bool = True,
) -> Predictions:
    """Load the heads and the backbone, check they belong together, and predict every audio file.

    `model_name` None: the fine-tuning output's own backbone (an error for heads trained on a cache).
    `device`: a torch.device as the command line resolved it (None: auto, as `--device auto`).
    """
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from extract.backbone import forward_layers, load_backbone  # noqa: PLC0415
    from heads.training.device import resolve_device  # noqa: PLC0415
    from heads.training.inputs import pad_frames  # noqa: PLC0415

    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device("auto") if device is None else device
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
    frame_layers, stride = heads.frame_layers, heads.frame_stride

    kept: list[Path] = []
    skipped: list[str] = []
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in heads.tasks.names}
    bar = tqdm(total=len(files), desc="predict", unit="file", disable=not progress)
    for tried, batch_paths, batch in clip_batches(files, heads.clip_seconds, batch_size, skip_bad=skip_bad,
                                                  skipped=skipped):
        bar.update(tried)
        if not batch_paths:
            continue
        with torch.inference_mode():
            pooled, _, frames = forward_layers(model, batch["waves"].to(device), batch["mask"].to(device),
                                               frame_layers=frame_layers, frame_stride=stride)
            padded, frame_mask = pad_frames(frames, frame_layers, device) if frame_layers else (None, None)
            out = apply_heads(heads, pooled, padded, frame_mask)
        for name in heads.tasks.names:
            chunks[name].append(out[name])
        kept.extend(batch_paths)
    bar.close()
    if not kept:
        raise PredictError(f"none of the {len(files)} audio file(s) could be read")
    return Predictions(kept, {name: np.concatenate(parts) for name, parts in chunks.items()}, heads.tasks, skipped)




def predictions_csv(preds: Predictions) -> str:
    """The CSV text: one row per file in the order read, columns as `csv_columns()`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_columns(preds.tasks))
    names = {t.name: preds.class_names(t.name) for t in preds.tasks if t.is_classification}
    for i, path in enumerate(preds.paths):
        row = [str(path)]
        for task in preds.tasks:
            if task.is_classification:
                row.append(names[task.name][i])
            row += [number_text(v) for v in preds.values[task.name][i]]
        writer.writerow(row)
    return buf.getvalue()


def write_predictions(path: str | os.PathLike, preds: Predictions) -> Path:
    from cache.command_kit.atomic import write_text_atomic  # noqa: PLC0415

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
@progress_option()
def predict_command(audio: tuple[Path, ...], model: str | None, heads_dir: Path, out: Path, batch_size: int,
                    skip_bad: bool, device: str | None, progress: bool) -> None:
    """Predict the heads' tasks for AUDIO (audio files, or folders searched recursively for *.wav). One CSV row
    per file: path, then per task its columns (a classification task: the class and p_<class> per class).
    A-VB: Voc_Type, p_<class>, then the Two, High and Culture columns."""
    from extract.backbone import hf_progress_bars  # noqa: PLC0415  (imports torch: only when the command runs)

    with command_errors():  # PredictError, AudioError, BackboneLoadError, HeadConfigError, write errors, signals
        from heads.training.device import resolve_device  # noqa: PLC0415

        run_device = resolve_device(device)   # the one resolution; a missing device fails before anything loads
        with hf_progress_bars(progress):
            preds = predict_files(model, heads_dir, audio, batch_size=batch_size, skip_bad=skip_bad,
                                  device=run_device, progress=progress)
        write_predictions(out, preds)
    extra = f", skipped {len(preds.skipped)} unreadable" if preds.skipped else ""
    click.echo(f"wrote {out} ({len(preds.paths)} file{'s' if len(preds.paths) != 1 else ''}{extra})")
