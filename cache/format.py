"""Format v1 of the feature cache: names, attribute encoding and the low-level read helpers.

Writer, reader and merge all go through this module, so the on-disk contract lives in one place
(and in `FORMAT.md`, which spells it out for people writing caches with plain h5py).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cache.command_kit.errors import AvbError
from cache.command_kit.jsonable import jsonable

FORMAT_NAME = "avb-feature-cache"
FORMAT_VERSION = 1
POOLING = "masked_mean"
DTYPES: tuple[str, ...] = ("float16", "float32")
# The cache knows nothing of tasks, but the split names are part of the file format.
SPLITS: tuple[str, ...] = ("Train", "Val", "Test")

# Dataset and group names.
IDS = "ids"
SPLITS_DS = "splits"
N_FRAMES = "n_frames"
LABELS = "labels"
POOLED = "pooled"
FRAMES = "frames"
FRAME_OFFSETS = "frame_offsets"
# Optional per-clip facts beside the labels, in the group `clip_info`: name -> kind. "group" is the clip's
# speaker (or other group; "" = none), so stage 2 can build speaker-independent folds from one dump;
# "backbone_trained" is 1 for a clip the backbone was fine-tuned on, so stage 2 can refuse to evaluate there.
CLIP_INFO = "clip_info"
CLIP_INFO_KINDS: dict[str, str] = {"group": "text", "backbone_trained": "flag"}

# Root attributes a reader needs; `code_version` is informative only and may be missing.
REQUIRED_ATTRS: tuple[str, ...] = (
    "format", "format_version", "backbone", "layers", "layer_dims", "pooling", "dtype",
    "sample_rate", "clip_seconds", "frame_layers", "frame_stride", "n_clips",
)
# Attributes that must hold JSON; any other string attribute starting with "{" or "[" is parsed too.
JSON_ATTRS: tuple[str, ...] = ("backbone", "layers", "layer_dims", "frame_layers", "tasks")
# Attributes the writer derives from its own arguments, so a caller's `attrs` may not set them.
RESERVED_ATTRS: tuple[str, ...] = (
    "format", "format_version", "layers", "layer_dims", "pooling", "dtype",
    "frame_layers", "frame_stride", "n_clips",
)
# Attributes that decide whether features from two caches are interchangeable (see check_compatible); a run
# records them, so its tasks ("tasks", the corpus description) travel with it.
COMPAT_ATTRS: tuple[str, ...] = ("backbone", "layers", "layer_dims", "pooling", "sample_rate", "clip_seconds", "tasks")

# Reads of scattered rows are coalesced into one slice when the gap between them is below this many bytes:
# one larger contiguous read beats many small ones on both local disks and network file systems.
COALESCE_GAP_BYTES = 1 << 20
# Target size of one chunk of a ragged frames dataset: small enough that random access to one clip reads
# little more than that clip, large enough that the chunk index stays small for ~10^7 frames.
FRAME_CHUNK_BYTES = 512 << 10


class CacheError(AvbError):
    """A cache file that is missing, incomplete, corrupt or inconsistent, or a bad argument to the writer."""


def code_version() -> str:
    """Version of the installed package, stored in every cache so a result can be traced to its code."""
    try:
        from importlib.metadata import version

        return version("avb-heads")
    except Exception:  # not installed (e.g. run from a source tree): still write a valid file
        return "unknown"


def n_frames_kept(n_frames: int | np.ndarray, stride: int) -> int | np.ndarray:
    """Frames stored for a clip with `n_frames` valid frames at `stride`: frames 0, s, 2s, ... i.e. ceil(n/s)."""
    return -(-n_frames // int(stride))


def check_name(kind: str, name: str) -> None:
    """Layer and label names become HDF5 dataset names, so they must be non-empty and free of '/'."""
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise CacheError(f"invalid {kind} name {name!r}: must be a non-empty string without '/'")


def encode_attr(key: str, value: Any) -> Any:
    """Turn a Python value into something h5py stores as an attribute: scalars as is, structures as JSON."""
    if value is None:
        raise CacheError(f"attribute '{key}' is None; HDF5 cannot store it (leave the key out instead)")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    try:
        return json.dumps(jsonable(value, nonfinite_to_none=False), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CacheError(f"attribute '{key}' is not JSON-serialisable: {err}") from None




def decode_attr(key: str, value: Any, *, where: str = "") -> Any:
    """Inverse of encode_attr for values read by h5py: numpy scalars to Python, JSON strings parsed.

    Only `json.loads` is used on stored strings, never eval, so a cache file cannot run code.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return [decode_attr(key, v, where=where) for v in value.tolist()]
    if isinstance(value, str):
        if key in JSON_ATTRS:
            try:
                return json.loads(value)
            except json.JSONDecodeError as err:
                raise CacheError(f"{where}attribute '{key}' is not valid JSON ({err.msg}): {value[:80]!r}") from None
        if value[:1] in ("{", "["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def chunk_rows_for(n_rows_hint: int, preferred: int) -> int:
    """Rows per chunk of a per-clip dataset: `preferred`, or fewer for a file known to be smaller."""
    return max(1, min(int(preferred), int(n_rows_hint)))


def frame_chunk_rows(row_bytes: int, n_rows_hint: int | None = None) -> int:
    """Rows per chunk of a ragged frames dataset, sized by bytes (FRAME_CHUNK_BYTES)."""
    rows = max(1, FRAME_CHUNK_BYTES // max(1, int(row_bytes)))
    if n_rows_hint is not None:
        rows = min(rows, max(1, int(n_rows_hint)))
    return rows


def _row_bytes(ds: Any) -> int:
    return int(math.prod(ds.shape[1:])) * int(ds.dtype.itemsize)


def read_rows(ds: Any, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """ds[rows] for any order of (distinct or repeated) row indices, read as few contiguous slices.

    h5py's fancy indexing needs increasing indices and is slow for long lists; instead the sorted rows are
    grouped into spans whose gaps are under COALESCE_GAP_BYTES, each span is read with one slice and the
    wanted rows are taken from it in memory. Memory stays bounded by the span sizes, never the dataset.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows),) + tuple(ds.shape[1:]), dtype=ds.dtype)
    if len(rows) == 0:
        return out
    if rows.min() < 0 or rows.max() >= ds.shape[0]:
        raise CacheError(f"row index out of range 0..{ds.shape[0] - 1} in {ds.name}")
    max_gap = max(1, COALESCE_GAP_BYTES // max(1, _row_bytes(ds)))
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    breaks = np.flatnonzero(np.diff(srt) > max_gap) + 1
    for group in np.split(np.arange(len(srt)), breaks):
        lo, hi = int(srt[group[0]]), int(srt[group[-1]]) + 1
        block = ds[lo:hi]
        out[order[group]] = block[srt[group] - lo]
    return out


def read_ranges(ds: Any, starts: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """[ds[s:e] for s, e in zip(starts, ends)], coalescing nearby ranges into single slice reads."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    ends = np.asarray(ends, dtype=np.int64).reshape(-1)
    out: list[np.ndarray] = [np.empty((0,) + tuple(ds.shape[1:]), ds.dtype)] * len(starts)
    if len(starts) == 0:
        return out
    if (ends < starts).any() or starts.min() < 0 or ends.max() > ds.shape[0]:
        raise CacheError(f"frame range out of bounds 0..{ds.shape[0]} in {ds.name}")
    max_gap = max(1, COALESCE_GAP_BYTES // max(1, _row_bytes(ds)))
    order = np.argsort(starts, kind="stable")
    i = 0
    while i < len(order):
        lo, hi = int(starts[order[i]]), int(ends[order[i]])
        j = i
        while j + 1 < len(order) and int(starts[order[j + 1]]) - hi <= max_gap:
            j += 1
            hi = max(hi, int(ends[order[j]]))
        block = ds[lo:hi]
        for k in order[i:j + 1]:
            out[k] = block[int(starts[k]) - lo:int(ends[k]) - lo]
        i = j + 1
    return out
