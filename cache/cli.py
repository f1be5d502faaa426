"""`avb cache ...`: look inside a feature cache without writing Python."""
from __future__ import annotations

import json
from typing import Any

import click

from cache.command_kit.command import command_errors
from cache.command_kit.options import OptionOrArgumentCommand, option_or_argument
from cache.reader import cache_info

CACHE_PATH = click.Path(dir_okay=True, path_type=str)
CACHE_HELP = "HDF5 feature cache written by `avb dump` (or by hand, see cache/FORMAT.md)."


@click.group("cache")
def cache_group() -> None:
    """Inspect HDF5 feature caches (see cache/FORMAT.md for the layout)."""


@cache_group.command("info", cls=OptionOrArgumentCommand)
@option_or_argument("--cache", "file", "FILE", type=CACHE_PATH, help=CACHE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the information as one JSON object.")
def info_command(file: str, as_json: bool) -> None:
    """Show what the --cache file holds: backbone, layers, dtype, frames, clips per split, labels and size on disk."""
    with command_errors():
        info = cache_info(file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(format_info(info))


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_info(info: dict[str, Any]) -> str:
    """The human-readable summary printed by `avb cache info`."""
    backbone = info["backbone"]
    name = backbone.get("name_or_path", "?")
    model_type = backbone.get("model_type")
    layers = ", ".join(f"{layer} ({dim})" for layer, dim in info["layer_dims"].items())
    if info["frame_layers"]:
        frames = f"{', '.join(info['frame_layers'])} (stride {info['frame_stride']}, " \
                 f"{info['n_stored_frames']} frames stored)"
    else:
        frames = "none (pooled only)"
    splits = ", ".join(f"{split} {count}" for split, count in info["splits"].items())
    if info["labels"]:
        labels = ", ".join(
            f"{name}[{lab['width']}]" + (f" ({len(lab['classes'])} classes)" if "classes" in lab else "")
            for name, lab in info["labels"].items()
        )
    else:
        labels = "none"
    per = info["bytes_per_clip"]
    lines = [
        f"file:           {info['path']}",
        f"format:         {info['format']} v{info['format_version']} (written by code {info['code_version']})",
        f"backbone:       {name}" + (f" ({model_type})" if model_type else ""),
        f"layers:         {len(info['layers'])}: {layers}",
        f"pooling:        {info['pooling']}",
        f"dtype:          {info['dtype']}",
        f"audio:          {info['sample_rate']} Hz, {info['clip_seconds']:g} s clips",
        f"frame layers:   {frames}",
        f"clips:          {info['n_clips']} ({splits})",
        f"labels:         {labels}",
        f"size on disk:   {_size(info['file_bytes'])} (pooled {_size(info['pooled_bytes'])}, "
        f"frames {_size(info['frames_bytes'])})",
        f"bytes per clip: {_size(per['total'])} (pooled {_size(per['pooled'])}, frames {_size(per['frames'])})",
    ]
    return "\n".join(lines)
