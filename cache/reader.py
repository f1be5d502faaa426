"""Read a feature cache: validated attributes, the pooled features in memory, frame-level data on demand.

Stage 2 trains dozens of heads from the same features, so `load_cache` reads each requested dataset with
one slice into RAM once (pooled HUME-VB is ~1.2 GB in float16) and everything after that is numpy indexing.
Frame-level data can be far larger than memory, so `FrameReader` reads it per clip through an h5py handle
that each process opens for itself (an HDF5 handle must not be shared across a fork).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache.command_kit.jsonable import jsonable
from cache.format import (
    CLIP_INFO,
    CLIP_INFO_KINDS,
    COMPAT_ATTRS,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAME_OFFSETS,
    FRAMES,
    IDS,
    LABELS,
    N_FRAMES,
    POOLED,
    POOLING,
    REQUIRED_ATTRS,
    SPLITS,
    SPLITS_DS,
    CacheError,
    decode_attr,
    read_ranges,
    read_rows,
)

__all__ = [
    "CacheError", "CacheData", "FrameReader", "IncompatibleCache", "cache_info", "check_compatible", "compat_attrs",
    "label_meta", "load_cache", "read_attrs",
]


# ---------------------------------------------------------------------------------------------- opening
@contextmanager
def open_cache(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open a cache read-only, turning every way it can fail to open into a one-line CacheError."""
    p = Path(path)
    if not p.exists():
        raise CacheError(f"{p}: no such file")
    if p.is_dir():
        raise CacheError(f"{p} is a directory, not a cache file")
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise CacheError(f"{p} is not an HDF5 file")
    try:
        f = h5py.File(p, "r")
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CacheError(f"{p} cannot be opened: the HDF5 file is truncated or corrupt ({reason})") from None
    try:
        yield f
    except (OSError, RuntimeError) as err:  # a damaged chunk or B-tree surfaces only when the data is read
        raise CacheError(f"{p} is corrupt: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    finally:
        f.close()


def _parse_attrs(f: h5py.File, path: Path) -> dict[str, Any]:
    raw = dict(f.attrs)
    fmt = decode_attr("format", raw.get("format"))
    if fmt != FORMAT_NAME:
        raise CacheError(f"{path} is not an avb feature cache (attribute 'format' is {fmt!r}, "
                         f"expected {FORMAT_NAME!r})")
    version = decode_attr("format_version", raw.get("format_version"))
    if version != FORMAT_VERSION:
        raise CacheError(f"{path} has unsupported format_version {version!r} (this code reads {FORMAT_VERSION})")
    if "n_clips" not in raw:
        raise CacheError(f"{path} is incomplete: attribute 'n_clips' is missing (was it interrupted?)")
    for key in REQUIRED_ATTRS:
        if key not in raw:
            raise CacheError(f"{path} is corrupt: required attribute '{key}' is missing")
    attrs = {key: decode_attr(key, value, where=f"{path}: ") for key, value in raw.items()}

    def bad(key: str, why: str) -> CacheError:
        return CacheError(f"{path} is corrupt: attribute '{key}' {why}, got {attrs[key]!r}")

    layers, dims = attrs["layers"], attrs["layer_dims"]
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) and x for x in layers) \
            or len(set(layers)) != len(layers):
        raise bad("layers", "must be a non-empty JSON list of distinct names")
    if not isinstance(dims, dict) or set(dims) != set(layers) \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims.values()):
        raise bad("layer_dims", "must map every layer in 'layers' to a positive integer")
    attrs["layer_dims"] = {layer: dims[layer] for layer in layers}  # in layer order
    frame_layers = attrs["frame_layers"]
    if not isinstance(frame_layers, list) or not all(x in dims for x in frame_layers):
        raise bad("frame_layers", "must be a JSON list of names from 'layers'")
    for key in ("frame_stride", "n_clips", "sample_rate"):
        value = attrs[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "n_clips" else 1):
            raise bad(key, "must be a " + ("non-negative" if key == "n_clips" else "positive") + " integer")
    if isinstance(attrs["clip_seconds"], bool) or not isinstance(attrs["clip_seconds"], (int, float)) \
            or attrs["clip_seconds"] <= 0:
        raise bad("clip_seconds", "must be a positive number")
    attrs["clip_seconds"] = float(attrs["clip_seconds"])
    if attrs["dtype"] not in DTYPES:
        raise bad("dtype", f"must be one of {', '.join(DTYPES)}")
    if attrs["pooling"] != POOLING:
        raise bad("pooling", f"must be {POOLING!r} in format v{FORMAT_VERSION}")
    if not isinstance(attrs["backbone"], dict):
        raise bad("backbone", "must be a JSON object")
    return attrs


def label_meta(f: h5py.File, path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Label names -> column names, and label names -> class names (only for class-index labels)."""
    if LABELS not in f or not isinstance(f[LABELS], h5py.Group):
        raise CacheError(f"{path} is corrupt: group '{LABELS}' is missing")
    columns: dict[str, list[str]] = {}
    classes: dict[str, list[str]] = {}
    for name, ds in f[LABELS].items():
        for key, target in (("columns", columns), ("classes", classes)):
            if key not in ds.attrs:
                if key == "columns":
                    raise CacheError(f"{path} is corrupt: labels/{name} has no '{key}' attribute")
                continue
            value = ds.attrs[key]
            try:
                value = json.loads(value.decode() if isinstance(value, bytes) else value)
            except (TypeError, json.JSONDecodeError):
                raise CacheError(f"{path} is corrupt: labels/{name} attribute '{key}' is not a JSON list") from None
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise CacheError(f"{path} is corrupt: labels/{name} attribute '{key}' is not a JSON list of strings")
            target[name] = value
    return columns, classes


def _check_datasets(f: h5py.File, attrs: dict[str, Any], path: Path) -> None:
    """Metadata-only consistency checks: every dataset exists and agrees with n_clips and the layer dims."""
    n = attrs["n_clips"]

    def dataset(name: str) -> h5py.Dataset:
        obj = f.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise CacheError(f"{path} is corrupt: dataset '{name}' is missing")
        return obj

    try:
        for name in (IDS, SPLITS_DS, N_FRAMES, *(f"{CLIP_INFO}/{k}" for k in f.get(CLIP_INFO, {}))):
            ds = dataset(name)
            if ds.shape != (n,):
                raise CacheError(f"{path} is corrupt: dataset '{name}' has shape {ds.shape} but n_clips is {n}")
        columns, _ = label_meta(f, path)
        for name, cols in columns.items():
            ds = dataset(f"{LABELS}/{name}")
            if ds.shape != (n, len(cols)):
                raise CacheError(f"{path} is corrupt: dataset 'labels/{name}' has shape {ds.shape}, "
                                 f"expected ({n}, {len(cols)}) from n_clips and its columns")
        for layer, dim in attrs["layer_dims"].items():
            ds = dataset(f"{POOLED}/{layer}")
            if ds.shape != (n, dim):
                raise CacheError(f"{path} is corrupt: dataset 'pooled/{layer}' has shape {ds.shape}, "
                                 f"expected ({n}, {dim}) from n_clips and layer_dims")
            if ds.dtype != np.dtype(attrs["dtype"]):
                raise CacheError(f"{path} is corrupt: dataset 'pooled/{layer}' is {ds.dtype} "
                                 f"but attribute 'dtype' says {attrs['dtype']}")
        if attrs["frame_layers"]:
            offsets = dataset(FRAME_OFFSETS)
            if offsets.shape != (n + 1,):
                raise CacheError(f"{path} is corrupt: dataset '{FRAME_OFFSETS}' has shape {offsets.shape}, "
                                 f"expected ({n + 1},)")
            total = int(offsets[n])
            for layer in attrs["frame_layers"]:
                ds = dataset(f"{FRAMES}/{layer}")
                dim = attrs["layer_dims"][layer]
                if ds.shape != (total, dim):
                    raise CacheError(f"{path} is corrupt: dataset 'frames/{layer}' has shape {ds.shape}, "
                                     f"expected ({total}, {dim}) from frame_offsets and layer_dims")
    except (OSError, RuntimeError) as err:  # h5py reports damaged structure this way
        raise CacheError(f"{path} is corrupt: {str(err).splitlines()[0]}") from None


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed root attributes of a complete, structurally consistent cache (CacheError otherwise)."""
    with open_cache(path) as f:
        attrs = _parse_attrs(f, Path(path))
        _check_datasets(f, attrs, Path(path))
        return attrs


# ---------------------------------------------------------------------------------------------- in-memory data
@dataclass
class CacheData:
    """The per-clip arrays a head trains on, all in RAM; row i of every array is the same clip."""

    path: Path
    attrs: dict[str, Any]
    ids: np.ndarray                          # str [N]
    splits: np.ndarray                       # str [N]
    n_frames: np.ndarray                     # int32 [N]
    labels: dict[str, np.ndarray]            # float32 [N, k], NaN where unknown
    label_columns: dict[str, list[str]]
    pooled: dict[str, np.ndarray]            # layer -> [N, D] in the stored dtype
    layers: list[str]                        # the loaded layers, in the order asked for
    layer_dims: dict[str, int]
    frame_layers: list[str]
    frame_stride: int
    label_classes: dict[str, list[str]] = field(default_factory=dict)
    rows: np.ndarray | None = None           # file row of each loaded row (for FrameReader.get)
    clip_info: dict[str, np.ndarray] = field(default_factory=dict)   # optional per-clip facts (CLIP_INFO_KINDS)

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(len(self.ids), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, split: str) -> np.ndarray:
        """Positions (into these arrays, not the file) of the clips of one split, in stored order."""
        if split not in SPLITS:
            raise CacheError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == split)


def load_cache(
    path: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
) -> CacheData:
    """Load ids, labels and the pooled features of `layers` (default all) for the clips of `splits`."""
    p = Path(path)
    with open_cache(p) as f:
        attrs = _parse_attrs(f, p)
        _check_datasets(f, attrs, p)
        all_dims = attrs["layer_dims"]
        if layers is None:
            wanted = list(attrs["layers"])
        else:
            wanted = [layers] if isinstance(layers, str) else list(layers)
            for layer in wanted:
                if layer not in all_dims:
                    raise CacheError(f"{p} has no layer '{layer}'; it holds {', '.join(attrs['layers'])}")
            if len(set(wanted)) != len(wanted):
                raise CacheError(f"layers lists a layer twice: {wanted}")
        ids = np.asarray(f[IDS].asstr()[()], dtype=str)
        split_arr = np.asarray(f[SPLITS_DS].asstr()[()], dtype=str)
        if splits is None:
            rows = None
        else:
            wanted_splits = [splits] if isinstance(splits, str) else list(splits)
            for split in wanted_splits:
                if split not in SPLITS:
                    raise CacheError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
            rows = np.flatnonzero(np.isin(split_arr, wanted_splits))
            if len(rows) == len(ids):
                rows = None

        def read(ds: h5py.Dataset) -> np.ndarray:
            # One slice for everything, or coalesced sorted reads of just the selected rows.
            return ds[()] if rows is None else read_rows(ds, rows)

        def take(arr: np.ndarray) -> np.ndarray:
            return arr if rows is None else arr[rows]

        columns, classes = label_meta(f, p)
        data = CacheData(
            path=p,
            attrs=attrs,
            ids=take(ids),
            splits=take(split_arr),
            n_frames=read(f[N_FRAMES]),
            labels={name: read(f[LABELS][name]).astype(np.float32, copy=False) for name in columns},
            label_columns=columns,
            pooled={layer: read(f[POOLED][layer]) for layer in wanted},
            layers=wanted,
            layer_dims={layer: all_dims[layer] for layer in wanted},
            frame_layers=list(attrs["frame_layers"]),
            frame_stride=int(attrs["frame_stride"]),
            label_classes=classes,
            rows=None if rows is None else rows.astype(np.int64),
            clip_info={name: take(np.asarray(f[CLIP_INFO][name].asstr()[()], dtype=str))
                       if CLIP_INFO_KINDS.get(name) == "text" else read(f[CLIP_INFO][name])
                       for name in f.get(CLIP_INFO, {})},
        )
    return data


# ---------------------------------------------------------------------------------------------- frames
class FrameReader:
    """Frame-level states of the clips, read on demand.

    The h5py handle is opened lazily and re-opened whenever the process id changes, so one FrameReader can
    be built in the parent and used by forked DataLoader workers; pickling drops the handle (spawn works too).
    """

    def __init__(self, path: str | os.PathLike, layers: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        attrs = read_attrs(self.path)
        frame_layers = list(attrs["frame_layers"])
        if not frame_layers:
            raise CacheError(f"{self.path} holds no frame-level layers (it was dumped with pooled features only)")
        wanted = frame_layers if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        for layer in wanted:
            if layer not in frame_layers:
                raise CacheError(f"{self.path} has no frames for layer '{layer}'; "
                                 f"frame layers are {', '.join(frame_layers)}")
        self.layers = wanted
        self.layer_dims = {layer: attrs["layer_dims"][layer] for layer in wanted}
        self.frame_stride = int(attrs["frame_stride"])
        self.dtype = np.dtype(attrs["dtype"])
        with open_cache(self.path) as f:
            self.offsets = f[FRAME_OFFSETS][()].astype(np.int64)
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"] = None
        state["_pid"] = None
        return state

    def lengths(self) -> np.ndarray:
        """Stored frames per clip, T_i = ceil(n_frames_i / frame_stride)."""
        return np.diff(self.offsets)

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, list[np.ndarray]]:
        """layer -> [frames of clip i for i in indices], each [T_i, D]; indices are file rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise CacheError(f"{self.path}: clip index {int(idx[(idx < 0) | (idx >= len(self))][0])} "
                             f"out of range for {len(self)} clips")
        f = self._file()
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        try:
            return {layer: read_ranges(f[FRAMES][layer], starts, ends) for layer in self.layers}
        except (OSError, RuntimeError) as err:  # damaged chunks are found only when read
            raise CacheError(f"{self.path} is corrupt: {str(err).splitlines()[0]}") from None

    def nbytes(self, layers: Sequence[str] | None = None) -> int:
        """Bytes that load_all(layers) would allocate."""
        layers = self.layers if layers is None else list(layers)
        return int(self.offsets[-1]) * sum(self.layer_dims[x] for x in layers) * self.dtype.itemsize

    def load_all(self, layers: Sequence[str] | None = None, *, max_bytes: int | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every clip's frames in memory: (layer -> [sum T_i, D], offsets [N+1]); clip i is rows offsets[i]:offsets[i+1]."""
        layers = self.layers if layers is None else list(layers)
        for layer in layers:
            if layer not in self.layer_dims:
                raise CacheError(f"{self.path}: layer '{layer}' is not one of this reader's {', '.join(self.layers)}")
        need = self.nbytes(layers)
        if max_bytes is not None and need > max_bytes:
            raise CacheError(f"{self.path}: frames of {', '.join(layers)} need {need / 2**30:.2f} GiB, "
                             f"more than the allowed {max_bytes / 2**30:.2f} GiB; read them with get() instead")
        f = self._file()
        try:
            return {layer: f[FRAMES][layer][()] for layer in layers}, self.offsets.copy()
        except (OSError, RuntimeError) as err:
            raise CacheError(f"{self.path} is corrupt: {str(err).splitlines()[0]}") from None

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._pid = None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- info / compat
def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `avb cache info` shows, JSON-ready: attributes, clip counts, labels and sizes."""
    p = Path(path)
    with open_cache(p) as f:
        attrs = _parse_attrs(f, p)
        _check_datasets(f, attrs, p)
        n = attrs["n_clips"]
        split_arr = np.asarray(f[SPLITS_DS].asstr()[()], dtype=str)
        counts = {split: int((split_arr == split).sum()) for split in SPLITS}
        other = sorted(set(split_arr.tolist()) - set(SPLITS))
        counts.update({split: int((split_arr == split).sum()) for split in other})
        columns, classes = label_meta(f, p)
        labels = {}
        for name, cols in columns.items():
            labels[name] = {"width": len(cols), "columns": cols}
            if name in classes:
                labels[name]["classes"] = classes[name]
        pooled_bytes = sum(int(f[POOLED][layer].id.get_storage_size()) for layer in attrs["layers"])
        frames_bytes = 0
        if attrs["frame_layers"]:
            frames_bytes = sum(int(f[FRAMES][layer].id.get_storage_size()) for layer in attrs["frame_layers"])
            frames_bytes += int(f[FRAME_OFFSETS].id.get_storage_size())
            n_stored_frames = int(f[FRAME_OFFSETS][n])
        else:
            n_stored_frames = 0
    file_bytes = p.stat().st_size
    return {
        "path": str(p),
        "format": attrs["format"],
        "format_version": attrs["format_version"],
        "code_version": attrs.get("code_version"),
        "backbone": attrs["backbone"],
        "layers": attrs["layers"],
        "layer_dims": attrs["layer_dims"],
        "pooling": attrs["pooling"],
        "dtype": attrs["dtype"],
        "sample_rate": attrs["sample_rate"],
        "clip_seconds": attrs["clip_seconds"],
        "frame_layers": attrs["frame_layers"],
        "frame_stride": attrs["frame_stride"],
        "n_clips": n,
        "n_stored_frames": n_stored_frames,
        "splits": counts,
        "labels": labels,
        "file_bytes": file_bytes,
        "pooled_bytes": pooled_bytes,
        "frames_bytes": frames_bytes,
        "bytes_per_clip": {
            "total": file_bytes / n if n else None,
            "pooled": pooled_bytes / n if n else None,
            "frames": frames_bytes / n if n else None,
        },
        "attrs": attrs,
    }


def compat_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that decide whether features are interchangeable: store these with a trained run and
    pass them to check_compatible before using that run on another cache."""
    return {key: attrs[key] for key in COMPAT_ATTRS if key in attrs}


class IncompatibleCache(CacheError):
    """`check_compatible`'s refusal, with the difference it found: `path` (keys and list indices from the
    top-level attribute down to the first differing value), `got` (that value in `attrs`) and `want` (in
    `expected`); a value absent on one side is `MISSING`."""

    def __init__(self, message: str, path: tuple[str | int, ...], got: Any, want: Any) -> None:
        super().__init__(message)
        self.path, self.got, self.want = path, got, want

    @property
    def key(self) -> str:
        """The top-level attribute that differs."""
        return str(self.path[0])

    @property
    def name(self) -> str:
        """The differing value's dotted name: `backbone.config.conv_stride[2]`."""
        return _dotted(self.path)

    @property
    def detail(self) -> str:
        """`key want vs got`, naming the nested value when the difference lies inside the attribute."""
        if len(self.path) == 1:
            return f"{self.key} {self.want!r} vs {self.got!r}"
        return f"{self.key} differs at {self.name}: {self.want!r} vs {self.got!r}"


def check_compatible(attrs: Mapping[str, Any], expected: Mapping[str, Any], *, source: str | os.PathLike | None = None
                     ) -> None:
    """Raise IncompatibleCache (a CacheError) naming the first key (dotted for nested values) where `attrs`
    differs from `expected`; keys `expected` does not name are not compared.

    A head trained on backbone A's layers is meaningless on backbone B's, and silently so; this check is
    what turns that into an error. Both sides are compared as JSON values (tuples equal lists).
    """
    where = f"{source}: " if source is not None else ""
    want_all = jsonable(dict(expected))
    for key, want in want_all.items():
        if key not in attrs:
            raise IncompatibleCache(f"{where}cache lacks attribute '{key}' (expected {want!r})", (key,), MISSING, want)
        got = jsonable(attrs[key])
        diff = _first_diff(got, want, (key,))
        if diff is not None:
            path, got_v, want_v = diff
            raise IncompatibleCache(f"{where}cache attribute '{_dotted(path)}' is {got_v!r}, but {want_v!r} is "
                                    "expected (features from a different backbone or layer set)", path, got_v, want_v)


MISSING = "<missing>"


def _dotted(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _first_diff(got: Any, want: Any, path: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], Any, Any] | None:
    if isinstance(got, dict) and isinstance(want, dict):
        for key in list(want) + [k for k in got if k not in want]:
            sub = _first_diff(got.get(key, MISSING), want.get(key, MISSING), (*path, key))
            if sub is not None:
                return sub
        return None
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want)):
            sub = _first_diff(a, b, (*path, i))
            if sub is not None:
                return sub
        return None
    return None if got == want else (path, got, want)
