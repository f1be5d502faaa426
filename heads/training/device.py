"""Where the heads run: `--device auto|cpu|cuda|cuda:N|mps`, and the matching mixed precision.

`auto` is CUDA when a CUDA device is visible, else the CPU (MPS is taken only when asked for: the heads'
fused optimiser step is written for CPU and CUDA kernels, and MPS falls back to slower paths). Asking for a
device the machine does not have is a one-line error that says what is missing, before anything is loaded.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from cache.command_kit.errors import AvbError
from heads.names import HEAD_PRECISIONS

DEVICE_CHOICES_HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps"


class DeviceError(AvbError):
    """A device or precision this machine or build cannot give."""


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch.device for a user's `--device` value, checked against what this machine has. Called once, by
    the command that reads the option; everything below it takes the torch.device."""
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; expected {DEVICE_CHOICES_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise DeviceError(f"device {text!r}: CUDA is not available ({why}, torch {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {text!r}: CUDA has {count} device(s) (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"device {text!r}: MPS (Apple GPU) is not available on this machine")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; expected {DEVICE_CHOICES_HELP}")
    return device


def check_precision(precision: str) -> str:
    if precision not in HEAD_PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; expected one of {', '.join(HEAD_PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for the heads' matmuls when asked for; parameters and optimiser state stay float32."""
    if check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def describe(device: torch.device) -> str:
    """A device as a person reads it: "cpu (2 threads)", "cuda:0 (NVIDIA H200)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
