"""Loading a trained model to apply: head runs, ensembles and fine-tuning outputs, and the backbone checks.

The heads were trained on features of one backbone, clip length and layer set, recorded in each run's
`config.json` (`cache_attrs`). A head applied to another backbone's features produces numbers that look
fine and mean nothing, so the backbone given is checked against that record first (layer names, widths and
the architecture fields of its config) and a mismatch is refused. A fine-tuning output's head only fits the
backbone it was fine-tuned with, so another `--model` must hold the same weights.

Torch is imported inside the functions: `extract.serve.predictor` imports this module only on the PyTorch path.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.command_kit.errors import AvbError
from extract.serve.errors import PredictError
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
from heads.tasks import TaskSet, tasks_of

# Config fields that define what a backbone's layers compute; two configs that differ here give features a
# head trained on one cannot use. Fields absent from both configs are skipped (HuBERT/WavLM variants).
ARCH_KEYS: tuple[str, ...] = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "layer_norm_eps",
)


@dataclass
class LoadedRun:
    """One trained run ready to apply: its head (eval mode, R = 1) and what it expects of the features."""

    path: Path
    head: Any                       # heads.model.architectures.MultiTaskHead
    cache_attrs: dict[str, Any]
    frame_stride: int = 1           # only for frame-mode BRANCH
    config: dict[str, Any] = field(default_factory=dict)   # its config.json

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
    from cache.reader import CacheError, read_attrs

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
    from safetensors.torch import load_file

    from heads.model.architectures import HeadConfigError

    if not weights.is_file():
        raise PredictError(f"{weights}: no such file (the run is incomplete or was not trained here)")
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
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
    from heads.model.architectures import HeadConfig, build_head

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
    return LoadedRun(ft_dir, head, attrs, config=config)


def load_run_head(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild a run's head from config.json and head.safetensors (the best epoch's weights)."""
    from heads.model.architectures import build_head
    from heads.training.joint import TrainConfig

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
    run = LoadedRun(run_dir, head, attrs, config=config)
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
    from cache.reader import IncompatibleCache, check_compatible
    from extract.backbone import layer_dims, layer_names

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


def _weight_files(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every weights file of a save_pretrained folder."""
    import hashlib

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


def load_backbone_for(heads: HeadSet, model_name: str | os.PathLike | None) -> tuple[Any, str]:
    """The backbone `heads` are applied to, checked against what they were trained on -> (model, its name).

    `model_name` None: a fine-tuning output's own backbone (an error for heads trained on a cache)."""
    from extract.backbone import load_backbone

    if model_name is None:
        if heads.backbone_dir is None:
            raise PredictError(f"--model is needed: the heads in {heads.source} were trained on cached features; "
                               "give the backbone the cache was dumped from")
        model_name = heads.backbone_dir
    check_finetuned_backbone(heads, str(model_name))
    model = load_backbone(model_name)
    for run in heads.runs:
        check_backbone(run, model, str(model_name))
    return model.eval(), str(model_name)
