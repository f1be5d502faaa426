"""The wav2vec2-family backbone: loading with SpecAugment, layer names, and one forward pass -> per-layer states.

Layer names used everywhere downstream (cache, heads): "cnn" is the 512-d CNN output (`extract_features`),
"hidden_0" .. "hidden_L" are `hidden_states[i]` (hidden_0 = projected CNN features entering the transformer,
hidden_L = last layer).

Attention-mask policy. Models whose CNN uses layer norm (`feat_extract_norm == "layer"`: wav2vec2-large-lv60,
HuBERT-large, WavLM) were pre-trained with padding masks, so they get `attention_mask`. Group-norm models such
as wav2vec2-base were pre-trained without one, and Hugging Face recommends plain zero padding for them: the
group norm of the first CNN layer normalises over the whole (padded) clip, so their valid frames do see the
padding. Both are harmless here because every clip is padded to the same fixed length: a clip's features are a
function of that clip alone, never of the other clips in its batch. Pooling always uses the mask: only the
frames computed from real samples are averaged.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cache.command_kit.errors import AvbError

if TYPE_CHECKING:  # accelerate is imported lazily, only by the commands that launch processes
    from accelerate import Accelerator


# SpecAugment settings every wav2vec2-family model reads in training, with wav2vec2's defaults. WavLMConfig
# (transformers 5) has no `mask_feature_min_masks`, yet WavLMModel reads it as soon as feature masking is on,
# so WavLM fine-tuning with the paper's feature masking would crash without this.
SPEC_AUGMENT_DEFAULTS: dict[str, int] = {"mask_time_min_masks": 2, "mask_feature_min_masks": 0}


class BackboneError(AvbError):
    """A backbone that cannot serve the request: unknown frame layers, layers skipped by LayerDrop."""


class BackboneLoadError(BackboneError):
    """A backbone name or directory that cannot be loaded as a wav2vec2-family model."""


class LaunchError(AvbError):
    """The launched processes did not form the process group they were launched as."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_backbone(
    name_or_dir: str | Path,
    *,
    spec_time_p: float = 0.05,
    spec_feature_p: float = 0.05,
    mask_time_length: int = 10,
    mask_feature_length: int = 10,
    freeze_cnn: bool = False,
    layerdrop: float = 0.0,
) -> nn.Module:
    """Load any wav2vec2-family encoder (wav2vec2, HuBERT, WavLM, ...) with SpecAugment configured.

    The paper masks both time steps and features with p = 0.05 (the reference code masked time only);
    Hugging Face applies the masking only in train mode, so the same model is augmentation-free in eval.
    The masking itself is each family's own (`_mask_hidden_states` of wav2vec2, HuBERT and WavLM), driven by
    the same config fields; a field a family's config lacks gets wav2vec2's default (SPEC_AUGMENT_DEFAULTS).
    LayerDrop is switched off by default (checkpoints such as wav2vec2-base ship with 0.05-0.1): the paper
    does not use it, and with transformers 5 a dropped layer is simply missing from `hidden_states`, which
    would give every later layer the wrong name ("hidden_5" holding layer 6). `forward_layers` refuses such
    output rather than mislabel it.
    """
    from transformers import AutoConfig, AutoModel

    name = str(name_or_dir)
    local = Path(name).is_dir()
    if local and not (Path(name) / "config.json").is_file():
        # transformers would guess a model type from the folder's name ("empty" -> 'mpt') instead of saying this
        raise BackboneLoadError(f"cannot load backbone from directory {name}: it has no config.json (expected a "
                                "folder written by save_pretrained, or a Hub model name)")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        if local:
            raise BackboneLoadError(f"cannot load backbone from directory {name}: {_first_line(exc)}") from None
        raise BackboneLoadError(
            f"cannot load backbone {name!r}: it is not a local directory and could not be downloaded from the "
            f"Hugging Face Hub ({_first_line(exc)})"
        ) from None
    if not all(hasattr(config, key) for key in ("conv_kernel", "conv_stride", "conv_dim")):
        raise BackboneLoadError(
            f"backbone {name!r} has model type {getattr(config, 'model_type', '?')!r}, which is not a "
            "wav2vec2-family audio encoder (wav2vec2, HuBERT, WavLM, ...)"
        )
    config.apply_spec_augment = True
    for key, value in SPEC_AUGMENT_DEFAULTS.items():   # fields a family's model reads but its config may lack
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    config.mask_time_prob = float(spec_time_p)
    config.mask_time_length = int(mask_time_length)
    config.mask_feature_prob = float(spec_feature_p)
    config.mask_feature_length = int(mask_feature_length)
    if hasattr(config, "layerdrop"):
        config.layerdrop = float(layerdrop)
    try:
        model = AutoModel.from_pretrained(name, config=config)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot load backbone weights of {name!r}: {_first_line(exc)}") from None
    if freeze_cnn:
        model.freeze_feature_encoder()
    return model


def layer_names(model: nn.Module) -> list[str]:
    """["cnn", "hidden_0", ..., "hidden_L"] for a backbone with L transformer layers."""
    return ["cnn"] + [f"hidden_{i}" for i in range(model.config.num_hidden_layers + 1)]


def layer_dims(model: nn.Module) -> dict[str, int]:
    """Width of every layer named by `layer_names` (CNN channels for "cnn", hidden size otherwise)."""
    dims = {name: int(model.config.hidden_size) for name in layer_names(model)}
    dims["cnn"] = int(model.config.conv_dim[-1])
    return dims


def uses_attention_mask(model: nn.Module) -> bool:
    """Whether the backbone gets `attention_mask` (layer-norm CNNs only; see the module docstring)."""
    return getattr(model.config, "feat_extract_norm", "group") == "layer"


def frame_counts(model: nn.Module, n_samples: Tensor) -> Tensor:
    """Number of frames the CNN computes from `n_samples` real samples (before any adapter)."""
    fn = model._get_feat_extract_output_lengths
    if "add_adapter" in inspect.signature(fn).parameters:
        return fn(n_samples, add_adapter=False).long()
    return fn(n_samples).long()


def layer_states(model: nn.Module, waves: Tensor, sample_mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """One backbone forward pass -> (states, n_frames): layer -> [B, T, D] for every `layer_names` layer (in the
    model's dtype), and [B] long valid frames per clip (at least 1, so a tiny clip still has a defined mean).

    Tensor operations only (no Python value read from a tensor), so `torch.onnx.export` traces it with a
    dynamic batch and length; `forward_layers` and the exported graph (`extract.serve.model`) both pool from it.
    """
    if waves.ndim != 2 or tuple(sample_mask.shape) != tuple(waves.shape):
        raise ValueError(
            f"the backbone needs waves [B, S] and a mask of the same shape, got {tuple(waves.shape)} and "
            f"{tuple(sample_mask.shape)}"
        )
    # HuBERT-style models return no `extract_features`: for them "cnn" is the CNN output itself, caught here.
    captured: dict[str, Tensor] = {}
    hook = model.feature_extractor.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("cnn", out.transpose(1, 2))
    )
    try:
        out = model(
            waves,
            attention_mask=sample_mask.long() if uses_attention_mask(model) else None,
            output_hidden_states=True,
            return_dict=True,
        )
    finally:
        hook.remove()
    expected = model.config.num_hidden_layers + 1
    if out.hidden_states is None or len(out.hidden_states) != expected:
        got = 0 if out.hidden_states is None else len(out.hidden_states)
        raise BackboneError(
            f"the backbone returned {got} hidden states instead of {expected} (LayerDrop "
            f"{getattr(model.config, 'layerdrop', '?')} skipped layers?); load it with layerdrop=0"
        )
    cnn = getattr(out, "extract_features", None)
    states = {"cnn": cnn if cnn is not None else captured["cnn"]}
    states.update({f"hidden_{i}": h for i, h in enumerate(out.hidden_states)})
    n_steps = states["hidden_0"].shape[1]
    n_frames = frame_counts(model, sample_mask.long().sum(-1)).clamp(min=1, max=n_steps)
    return states, n_frames


def valid_frames(n_frames: Tensor, n_steps: int | Tensor, stride: int = 1) -> Tensor:
    """[B, ceil(n_steps / stride)] bool: which of the frames 0, s, 2s, ... of each clip are real (not padding)."""
    steps = torch.arange(0, n_steps, stride, device=n_frames.device)
    return steps[None, :] < n_frames[:, None]


def pool_states(states: dict[str, Tensor], n_frames: Tensor) -> dict[str, Tensor]:
    """layer -> [B, D] float32: the mean over each clip's valid frames only (every layer has the same frames)."""
    valid = valid_frames(n_frames, next(iter(states.values())).shape[1]).float()
    denom = n_frames.float()[:, None]
    return {name: (h.float() * valid[..., None]).sum(1) / denom for name, h in states.items()}


def check_frame_layers(model: nn.Module, frame_layers: Sequence[str], frame_stride: int) -> None:
    if frame_stride < 1:
        raise BackboneError(f"frame_stride must be >= 1, got {frame_stride}")
    names = layer_names(model)
    unknown = [layer for layer in frame_layers if layer not in names]
    if unknown:
        raise BackboneError(f"unknown frame layer(s) {', '.join(unknown)}; this backbone has {', '.join(names)}")


def forward_layers(
    model: nn.Module,
    waves: Tensor,
    sample_mask: Tensor,
    *,
    frame_layers: Sequence[str] = (),
    frame_stride: int = 1,
) -> tuple[dict[str, Tensor], Tensor, dict[str, list[Tensor]]]:
    """One backbone forward pass -> (pooled, n_frames, frames).

    pooled: layer -> [B, D] float32, the mean over each clip's valid frames only.
    n_frames: [B] long, valid frames per clip (at least 1, so a tiny clip still has a defined mean).
    frames: layer -> list of B float32 tensors [ceil(n_i / frame_stride), D] for each of `frame_layers`:
    the valid frames 0, s, 2s, ... of that clip.
    Works under autocast: states may come out in half precision, and pooling is done in float32.
    """
    check_frame_layers(model, frame_layers, frame_stride)
    states, n_frames = layer_states(model, waves, sample_mask)
    frames = {
        layer: [states[layer][b, : int(n) : frame_stride].float() for b, n in enumerate(n_frames.tolist())]
        for layer in frame_layers
    }
    return pool_states(states, n_frames), n_frames, frames



def make_accelerator(**kwargs) -> "Accelerator":
    """An `Accelerator` that also forms a process group for multi-process launches on machines without GPUs.

    `accelerate launch --multi_gpu --num_processes N` on a CPU-only machine starts N processes with WORLD_SIZE
    set, but accelerate only builds a (gloo) process group when told to run on CPU; otherwise every process
    silently believes it is alone and they all write the same files. So CPU mode is switched on here when
    several processes were launched and no GPU-like device exists, and a mismatch is an error, not a race.
    """
    from accelerate import Accelerator
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    has_device = torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mlu_available()
    if world > 1 and not has_device:
        kwargs.setdefault("cpu", True)
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:
        raise LaunchError(
            f"{world} processes were launched (WORLD_SIZE={world}) but accelerate formed a group of "
            f"{accelerator.num_processes}; check the accelerate config of this machine"
        )
    return accelerator


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own bars (loading and saving weights); --quiet silences them too, and the
    global switch is restored afterwards so an in-process caller keeps its setting."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()
