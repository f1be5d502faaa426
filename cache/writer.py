"""Write a feature cache (one process) and merge the per-rank shards of a distributed dump into one file.

The writer buffers appended rows and writes them in blocks of `chunk_rows` into resizable datasets that
grow in whole-chunk steps: the dump hands over a handful of clips per batch, and writing those one small
slice at a time into 1.5 MB chunks would rewrite every chunk dozens of times. The file is written under a
temporary name and renamed only by a successful `close()`, and `n_clips` is the last attribute written, so
a crash never leaves something at the final path that a reader would take for a complete cache. HDF5 writes
through a `GuardedFile`, so a full disk ends in a WriteError (and no temporary file), never in a crash.
"""
from __future__ import annotations

import errno
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache.command_kit.atomic import atomic_path
from cache.command_kit.errors import where
from cache.command_kit.interrupt import raise_pending
from cache.command_kit.write_errors import WriteError, write_errno
from cache.format import (
    CLIP_INFO,
    CLIP_INFO_KINDS,
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
    RESERVED_ATTRS,
    SPLITS,
    SPLITS_DS,
    CacheError,
    check_name,
    chunk_rows_for,
    code_version,
    encode_attr,
    frame_chunk_rows,
    n_frames_kept,
    read_ranges,
    read_rows,
)
from cache.guarded_file import GuardedFile
from cache.reader import label_meta, read_attrs

# Attributes a cache needs that only the caller knows (the dump fills them from the backbone and audio config).
CALLER_ATTRS: tuple[str, ...] = ("backbone", "sample_rate", "clip_seconds")
# Flush the buffer early once it holds this much, so frame-level dumps do not buffer gigabytes.
FLUSH_BYTES = 64 << 20
# Bytes of features one merge step handles at most.
MERGE_BLOCK_BYTES = 128 << 20


class CacheWriter:
    """Context manager that writes one cache file; see FORMAT.md for what ends up on disk.

    Usage::

        with CacheWriter(path, layer_dims={"cnn": 512, "hidden_0": 768}, label_columns={"two": ["Valence", "Arousal"]},
                         attrs={"backbone": {...}, "sample_rate": 16000, "clip_seconds": 2.5}) as w:
            w.append(ids, splits, labels, n_frames, pooled)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layer_dims: Mapping[str, int],
        label_columns: Mapping[str, Sequence[str]],
        attrs: Mapping[str, Any],
        frame_layers: Sequence[str] = (),
        frame_stride: int = 1,
        dtype: str = "float16",
        label_classes: Mapping[str, Sequence[str]] | None = None,
        chunk_rows: int = 1024,
        compression: str | None = None,
        expected_clips: int | None = None,
        clip_info: Sequence[str] = (),
    ) -> None:
        """`expected_clips`: how many clips the file will hold, if known; only sizes the hint of a full disk.
        `clip_info`: which optional per-clip facts (`CLIP_INFO_KINDS`) every `append` gives."""
        self.path = Path(path)
        self.clip_info = list(clip_info)
        unknown = [name for name in self.clip_info if name not in CLIP_INFO_KINDS]
        if unknown:
            raise CacheError(f"unknown clip_info {unknown[0]!r}; expected some of {', '.join(CLIP_INFO_KINDS)}")
        self.expected_clips = expected_clips
        self.layer_dims = _check_layer_dims(layer_dims)
        self.label_columns = _check_label_columns(label_columns)
        self.label_classes = _check_label_classes(label_classes or {}, self.label_columns)
        self.frame_layers = list(frame_layers)
        for layer in self.frame_layers:
            if layer not in self.layer_dims:
                raise CacheError(f"frame layer '{layer}' is not in layer_dims ({', '.join(self.layer_dims)})")
        if len(set(self.frame_layers)) != len(self.frame_layers):
            raise CacheError(f"frame_layers lists a layer twice: {self.frame_layers}")
        if isinstance(frame_stride, bool) or not isinstance(frame_stride, (int, np.integer)) or frame_stride < 1:
            raise CacheError(f"frame_stride must be an integer >= 1, got {frame_stride!r}")
        self.frame_stride = int(frame_stride)
        if dtype not in DTYPES:
            raise CacheError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = np.dtype(dtype)
        if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise CacheError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
        self.chunk_rows = int(chunk_rows)
        self.compression = compression
        root_attrs = self._root_attrs(attrs)

        self._n = 0                 # rows written to disk
        self._frame_n = 0           # frame rows written to disk
        self._seen: set[str] = set()
        self._buffer: list[dict[str, Any]] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self._created = False
        self._closed = False
        self._atomic = atomic_path(self.path, suffix=".h5")
        self._tmp = self._atomic.__enter__()
        try:
            self._file = GuardedFile(self._tmp)
            # A generous chunk cache keeps a partly written chunk in memory between flushes.
            self._h5 = h5py.File(self._file, "w", rdcc_nbytes=FLUSH_BYTES)
            for key, value in root_attrs.items():
                self._h5.attrs[key] = value
            raise_pending()   # a signal HDF5's calls into the GuardedFile held
        except BaseException as err:
            self._abort(err)
            raise

    # ------------------------------------------------------------------ public API
    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None:
            failure = self._failure_behind(exc)
            self._abort(failure or exc)
            if failure is not None:
                raise failure from exc
        elif not self._closed:
            self.close()
        return False

    @property
    def n_clips(self) -> int:
        """Clips appended so far (written or buffered)."""
        return self._n + self._buffer_rows

    def append(
        self,
        ids: Sequence[str],
        splits: Sequence[str],
        labels: Mapping[str, np.ndarray],
        n_frames: np.ndarray | Sequence[int],
        pooled: Mapping[str, np.ndarray],
        frames: Mapping[str, Sequence[np.ndarray]] | None = None,
        clip_info: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Add a batch of B clips. Everything is validated before anything is buffered, so a bad batch
        raises CacheError and leaves the writer as it was."""
        if self._closed:
            raise CacheError(f"{self.path}: append after close")
        ids = self._checked_ids(ids)
        at = functools.partial(self._at, ids)   # at(i, what): where clip i of the batch would go in the file
        b = len(ids)
        block: dict[str, Any] = {IDS: ids, SPLITS_DS: self._checked_splits(splits, at, b),
                                 N_FRAMES: self._checked_n_frames(n_frames, at, b)}
        block[LABELS] = self._label_block(labels, at, b)
        block[POOLED] = self._pooled_block(pooled, at, b)
        block[FRAMES] = self._frame_block(frames, block[N_FRAMES], at)
        block[CLIP_INFO] = self._clip_info_block(clip_info or {}, b)
        block["nbytes"] = sum(a.nbytes for a in block[POOLED].values()) + sum(
            a.nbytes for clips in block[FRAMES].values() for a in clips)
        self._seen.update(block[IDS])
        self._buffer.append(block)
        self._buffer_rows += len(block[IDS])
        self._buffer_bytes += block["nbytes"]
        if self._buffer_rows >= self.chunk_rows or self._buffer_bytes >= FLUSH_BYTES:
            self._flush(final=False)
            self._raise_write_error()
            raise_pending()

    def close(self) -> Path:
        """Write what is buffered, trim the datasets, set `n_clips` and rename the file into place."""
        if self._closed:
            return self.path
        try:
            self._flush(final=True)
            self._trim()
            self._h5.attrs["n_clips"] = int(self._n)
            self._h5.close()
            self._file.close()
            self._raise_write_error()
            raise_pending()
        except BaseException as err:
            failure = self._failure_behind(err)
            self._abort(failure or err)
            if failure is not None:
                raise failure from err
            raise
        self._closed = True
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Give up: close and delete the temporary file; nothing appears at the final path."""
        self._abort(CacheError("aborted"))

    # ------------------------------------------------------------------ internals
    def _write_failure(self) -> WriteError | None:
        """The write failure the GuardedFile kept (HDF5 itself was told the write succeeded), if any."""
        file = getattr(self, "_file", None)
        err = file.error if file is not None else None
        if err is None:
            return None
        needed = file.high
        if self.expected_clips and self.n_clips:
            needed = max(needed, int(needed * self.expected_clips / self.n_clips))
        failure = WriteError(write_errno(err) or err.errno or errno.EIO, self.path, needed)
        failure.__cause__ = err
        return failure

    def _raise_write_error(self) -> None:
        failure = self._write_failure()
        if failure is not None:
            raise failure

    def _failure_behind(self, err: BaseException) -> WriteError | None:
        """The kept write failure when `err` is only its consequence (HDF5 reading back data that was dropped)."""
        if self._closed or isinstance(err, WriteError) or not isinstance(err, Exception):
            return None
        return self._write_failure()

    def _root_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        for key in RESERVED_ATTRS:
            if key in attrs:
                raise CacheError(f"attrs may not set '{key}': the writer derives it from its own arguments")
        for key in CALLER_ATTRS:
            if key not in attrs:
                raise CacheError(f"attrs lacks '{key}' (required: {', '.join(CALLER_ATTRS)})")
        if not isinstance(attrs["backbone"], Mapping):
            raise CacheError(f"attrs['backbone'] must be a dict, got {type(attrs['backbone']).__name__}")
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "code_version": code_version(),
            "layers": encode_attr("layers", list(self.layer_dims)),
            "layer_dims": encode_attr("layer_dims", self.layer_dims),
            "pooling": POOLING,
            "dtype": self.dtype.name,
            "frame_layers": encode_attr("frame_layers", self.frame_layers),
            "frame_stride": self.frame_stride,
        }
        for key, value in attrs.items():
            if not isinstance(key, str) or not key:
                raise CacheError(f"attribute names must be non-empty strings, got {key!r}")
            out[key] = encode_attr(key, value)
        return out

    def _at(self, ids: list[str], i: int, what: str | None = None) -> str:
        """Where clip i of the batch would go in the file."""
        return "append: " + where(self.path, self.n_clips + i, ids[i], what)

    def _checked_ids(self, ids: Sequence[str]) -> list[str]:
        ids = list(ids)
        batch_seen: set[str] = set()
        for i, clip_id in enumerate(ids):
            if not isinstance(clip_id, str) or not clip_id:
                raise CacheError(f"append: ids must be non-empty strings, got {clip_id!r}")
            if clip_id.startswith("["):
                raise CacheError(f"append: id {clip_id!r} has brackets; the cache stores ids without them")
            if clip_id in self._seen or clip_id in batch_seen:
                raise CacheError(f"{self._at(ids, i)}: duplicate File_ID (already appended)")
            batch_seen.add(clip_id)
        return ids

    @staticmethod
    def _checked_splits(splits: Sequence[str], at: Any, b: int) -> list[str]:
        splits = list(splits)
        if len(splits) != b:
            raise CacheError(f"append: {len(splits)} splits for {b} ids")
        for i, split in enumerate(splits):
            if split not in SPLITS:
                raise CacheError(f"{at(i, 'split')}: {split!r} is not one of {', '.join(SPLITS)}")
        return splits

    @staticmethod
    def _checked_n_frames(n_frames: np.ndarray | Sequence[int], at: Any, b: int) -> np.ndarray:
        nf = np.asarray(n_frames)
        if nf.shape != (b,) or (b and not np.issubdtype(nf.dtype, np.integer)):
            raise CacheError(f"append: n_frames must be an integer array of shape ({b},), "
                             f"got {nf.dtype} {tuple(nf.shape)}")
        nf = nf.astype(np.int32)
        if b and nf.min() < 1:
            bad = int(np.argmin(nf))
            raise CacheError(f"{at(bad, 'n_frames')}: {int(nf[bad])}; every clip needs >= 1 valid frame")
        return nf

    def _label_block(self, labels: Mapping[str, np.ndarray], at: Any, b: int) -> dict[str, np.ndarray]:
        _check_keys("labels", labels, self.label_columns)
        block: dict[str, np.ndarray] = {}
        for name, columns in self.label_columns.items():
            arr = np.asarray(labels[name], dtype=np.float32)
            if arr.shape != (b, len(columns)):
                raise CacheError(f"append: labels['{name}'] has shape {tuple(arr.shape)}, expected ({b}, {len(columns)})")
            if name in self.label_classes:
                n_cls = len(self.label_classes[name])
                with np.errstate(invalid="ignore"):   # NaN (unknown) is allowed
                    bad = ~np.isnan(arr) & ((arr != np.round(arr)) | (arr < 0) | (arr >= n_cls))
                if bad.any():
                    i = int(np.argwhere(bad)[0][0])
                    raise CacheError(f"{at(i, f'labels[{name!r}]')}: {float(arr[bad][0])!r} is not a class index in "
                                     f"0..{n_cls - 1} (or NaN)")
            block[name] = arr
        return block

    def _pooled_block(self, pooled: Mapping[str, np.ndarray], at: Any, b: int) -> dict[str, np.ndarray]:
        _check_keys("pooled", pooled, self.layer_dims)
        block: dict[str, np.ndarray] = {}
        for layer, dim in self.layer_dims.items():
            arr = np.asarray(pooled[layer])
            if arr.shape != (b, dim):
                raise CacheError(f"append: pooled['{layer}'] has shape {tuple(arr.shape)}, expected ({b}, {dim})")
            block[layer] = _cast_finite(arr, self.dtype, f"pooled['{layer}']", at)
        return block

    def _frame_block(self, frames: Mapping[str, Sequence[np.ndarray]] | None, nf: np.ndarray, at: Any
                     ) -> dict[str, list[np.ndarray]]:
        if not self.frame_layers:
            if frames:
                raise CacheError("append: frames given but the writer has no frame_layers")
            return {}
        if frames is None:
            raise CacheError(f"append: frames are required for frame layers {', '.join(self.frame_layers)}")
        _check_keys("frames", frames, dict.fromkeys(self.frame_layers))
        want = n_frames_kept(nf.astype(np.int64), self.frame_stride)
        block: dict[str, list[np.ndarray]] = {}
        for layer in self.frame_layers:
            clips = list(frames[layer])
            if len(clips) != len(nf):
                raise CacheError(f"append: frames['{layer}'] has {len(clips)} clips for {len(nf)} ids")
            dim = self.layer_dims[layer]
            cast = []
            for i, clip in enumerate(clips):
                arr = np.asarray(clip)
                if arr.shape != (int(want[i]), dim):
                    raise CacheError(
                        f"{at(i, f'frames[{layer!r}]')}: shape {tuple(arr.shape)}, expected ({int(want[i])}, "
                        f"{dim}) = (ceil(n_frames {int(nf[i])} / stride {self.frame_stride}), dim)")
                cast.append(_cast_finite(arr, self.dtype, f"frames['{layer}']", lambda _, what, i=i: at(i, what)))
            block[layer] = cast
        return block

    def _clip_info_block(self, clip_info: Mapping[str, Sequence[Any]], b: int) -> dict[str, np.ndarray]:
        _check_keys("clip_info", clip_info, dict.fromkeys(self.clip_info))
        block = {}
        for name in self.clip_info:
            values = list(clip_info[name])
            if len(values) != b:
                raise CacheError(f"append: clip_info['{name}'] has {len(values)} values for {b} ids")
            if CLIP_INFO_KINDS[name] == "text":
                block[name] = np.array([str(v) for v in values], dtype=object)
            else:
                block[name] = np.array([bool(v) for v in values], dtype=np.uint8)
        return block

    def _create(self, final: bool) -> None:
        """Create the datasets on the first flush; if that flush is the last, chunks fit the whole file."""
        rows = chunk_rows_for(self._buffer_rows, self.chunk_rows) if final else self.chunk_rows
        self.chunk_rows = rows
        h5 = self._h5
        text = h5py.string_dtype("utf-8")
        h5.create_dataset(IDS, shape=(0,), maxshape=(None,), dtype=text, chunks=(rows,))
        h5.create_dataset(SPLITS_DS, shape=(0,), maxshape=(None,), dtype=text, chunks=(rows,))
        h5.create_dataset(N_FRAMES, shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(rows,))
        group = h5.create_group(LABELS)
        for name, columns in self.label_columns.items():
            ds = group.create_dataset(name, shape=(0, len(columns)), maxshape=(None, len(columns)),
                                      dtype=np.float32, chunks=(rows, len(columns)))
            ds.attrs["columns"] = encode_attr("columns", list(columns))
            if name in self.label_classes:
                ds.attrs["classes"] = encode_attr("classes", list(self.label_classes[name]))
        if self.clip_info:
            group = h5.create_group(CLIP_INFO)
            for name in self.clip_info:
                kind = text if CLIP_INFO_KINDS[name] == "text" else np.uint8
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=kind, chunks=(rows,))
        group = h5.create_group(POOLED)
        for layer, dim in self.layer_dims.items():
            group.create_dataset(layer, shape=(0, dim), maxshape=(None, dim), dtype=self.dtype,
                                 chunks=(rows, dim), compression=self.compression)
        if self.frame_layers:
            total = sum(len(c) for blk in self._buffer for c in next(iter(blk[FRAMES].values()))) if final else None
            group = h5.create_group(FRAMES)
            for layer in self.frame_layers:
                dim = self.layer_dims[layer]
                # Byte-sized, but never much more than a block of clips (~124 frames each at stride 1).
                frows = min(frame_chunk_rows(dim * self.dtype.itemsize, total), 128 * rows)
                group.create_dataset(layer, shape=(0, dim), maxshape=(None, dim), dtype=self.dtype,
                                     chunks=(frows, dim), compression=self.compression)
            h5.create_dataset(FRAME_OFFSETS, data=np.zeros(1, np.int64), maxshape=(None,),
                              chunks=(max(rows, 2),))
        self._created = True

    def _flush(self, final: bool) -> None:
        if not self._created:
            self._create(final)
        if not self._buffer:
            return
        blocks, self._buffer = self._buffer, []
        b = self._buffer_rows
        self._buffer_rows = self._buffer_bytes = 0
        n0, n1 = self._n, self._n + b
        h5 = self._h5
        _write(h5[IDS], n0, np.array([i for blk in blocks for i in blk[IDS]], dtype=object), self.chunk_rows)
        _write(h5[SPLITS_DS], n0, np.array([s for blk in blocks for s in blk[SPLITS_DS]], dtype=object),
               self.chunk_rows)
        _write(h5[N_FRAMES], n0, np.concatenate([blk[N_FRAMES] for blk in blocks]), self.chunk_rows)
        for name in self.label_columns:
            _write(h5[LABELS][name], n0, np.concatenate([blk[LABELS][name] for blk in blocks]), self.chunk_rows)
        for name in self.clip_info:
            _write(h5[CLIP_INFO][name], n0, np.concatenate([blk[CLIP_INFO][name] for blk in blocks]),
                   self.chunk_rows)
        for layer in self.layer_dims:
            _write(h5[POOLED][layer], n0, np.concatenate([blk[POOLED][layer] for blk in blocks]), self.chunk_rows)
        if self.frame_layers:
            lengths = np.array([len(c) for blk in blocks for c in blk[FRAMES][self.frame_layers[0]]], np.int64)
            offsets = self._frame_n + np.cumsum(lengths)
            _write(h5[FRAME_OFFSETS], n0 + 1, offsets, self.chunk_rows)
            for layer in self.frame_layers:
                ds = h5[FRAMES][layer]
                data = np.concatenate([c for blk in blocks for c in blk[FRAMES][layer]], axis=0)
                _write(ds, self._frame_n, data, ds.chunks[0])
            self._frame_n = int(offsets[-1]) if len(offsets) else self._frame_n
        self._n = n1

    def _trim(self) -> None:
        """Shrink the datasets from their chunk-rounded capacity to the rows actually written."""
        h5 = self._h5
        per_clip = [h5[IDS], h5[SPLITS_DS], h5[N_FRAMES]] + [h5[LABELS][n] for n in self.label_columns] \
            + [h5[POOLED][layer] for layer in self.layer_dims] + [h5[CLIP_INFO][n] for n in self.clip_info]
        for ds in per_clip:
            ds.resize(self._n, axis=0)
        if self.frame_layers:
            h5[FRAME_OFFSETS].resize(self._n + 1, axis=0)
            for layer in self.frame_layers:
                h5[FRAMES][layer].resize(self._frame_n, axis=0)

    def _abort(self, err: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            h5 = getattr(self, "_h5", None)
            if h5 is not None and h5.id.valid:
                h5.close()
        finally:
            file = getattr(self, "_file", None)
            if file is not None:
                file.close()
            # Hands the exception to atomic_path, whose cleanup deletes the temporary file.
            self._atomic.__exit__(type(err), err, err.__traceback__)


def _write(ds: h5py.Dataset, start: int, data: np.ndarray, step: int) -> None:
    """ds[start:start+len(data)] = data, growing the dataset to the next multiple of `step` rows if needed."""
    end = start + len(data)
    if end > ds.shape[0]:
        ds.resize(-(-end // step) * step, axis=0)
    if len(data):
        ds[start:end] = data


def _cast_finite(arr: np.ndarray, dtype: np.dtype, what: str, at: Any) -> np.ndarray:
    """`arr` as `dtype`, refused when a value is not finite there; `at(row, what)` says where row `row` goes."""
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise CacheError(f"append: {what} has dtype {arr.dtype}, expected a float array")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with the clip id
        out = np.ascontiguousarray(arr, dtype=dtype)
    finite = np.isfinite(out)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise CacheError(f"{at(row, what)}: not finite after casting to {dtype} "
                         f"(source value {arr[np.unravel_index(int(np.argmin(finite)), arr.shape)]!r})")
    return out


def _check_keys(what: str, given: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    if not isinstance(given, Mapping):
        raise CacheError(f"append: {what} must be a dict, got {type(given).__name__}")
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing:
        raise CacheError(f"append: {what} lacks {', '.join(repr(k) for k in missing)}")
    if extra:
        raise CacheError(f"append: {what} has unexpected {', '.join(repr(k) for k in extra)}")


def _check_layer_dims(layer_dims: Mapping[str, int]) -> dict[str, int]:
    if not layer_dims:
        raise CacheError("layer_dims is empty: a cache needs at least one layer")
    out = {}
    for layer, dim in layer_dims.items():
        check_name("layer", layer)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise CacheError(f"layer_dims['{layer}'] must be a positive integer, got {dim!r}")
        out[layer] = int(dim)
    return out


def _check_label_columns(label_columns: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out = {}
    for name, columns in label_columns.items():
        check_name("label", name)
        columns = list(columns) if not isinstance(columns, str) else [columns]
        if not columns or not all(isinstance(c, str) and c for c in columns):
            raise CacheError(f"label_columns['{name}'] must be a non-empty list of column names, got {columns!r}")
        out[name] = columns
    return out


def _check_label_classes(label_classes: Mapping[str, Sequence[str]],
                         label_columns: Mapping[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for name, classes in label_classes.items():
        if name not in label_columns:
            raise CacheError(f"label_classes names '{name}', which is not in label_columns")
        if len(label_columns[name]) != 1:
            raise CacheError(f"label '{name}' has classes, so it must have exactly one column (the class index)")
        classes = list(classes)
        if not classes:
            raise CacheError(f"label_classes['{name}'] is empty")
        out[name] = classes
    return out


# ---------------------------------------------------------------------------------------------- merge
def merge_shards(
    shard_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    order: Sequence[str] | None = None,
    chunk_rows: int = 1024,
    compression: str | None = None,
) -> Path:
    """Concatenate the caches written by the ranks of a distributed dump into one cache.

    Rows end up in `order` (every id exactly once) or, by default, sorted by id, so the merged file does
    not depend on how many ranks wrote it. Shards must agree on every attribute except `n_clips` and
    `code_version` and on their label columns. Features are copied in blocks of at most `chunk_rows` clips
    and MERGE_BLOCK_BYTES, so memory stays bounded whatever the size of the shards.
    """
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise CacheError("merge_shards: no shard files given")
    ref = _agreed_attrs(paths)
    files = [h5py.File(p, "r") for p in paths]
    try:
        label_columns, label_classes = _agreed_labels(files, paths)
        out_ids, src_shard, src_row = _source_rows(files, paths, order)
        shards = _Shards.read(files, ref, label_columns)
        n_total = len(out_ids)
        block = _block_rows(shards, n_total, chunk_rows)
        writer = CacheWriter(out_path, layer_dims=shards.layer_dims, label_columns=label_columns,
                             attrs={k: v for k, v in ref.items() if k not in RESERVED_ATTRS},
                             frame_layers=shards.frame_layers, frame_stride=int(ref["frame_stride"]),
                             dtype=ref["dtype"], label_classes=label_classes,
                             chunk_rows=chunk_rows_for(n_total, chunk_rows), compression=compression,
                             expected_clips=n_total, clip_info=list(shards.clip_info))
        with writer:
            for b0 in range(0, n_total, block):
                writer.append(ids=out_ids[b0:b0 + block],
                              **shards.rows(src_shard[b0:b0 + block], src_row[b0:b0 + block]))
        return Path(out_path)
    finally:
        for f in files:
            f.close()


def _agreed_attrs(paths: list[Path]) -> dict[str, Any]:
    """The first shard's attributes, once every shard agrees with them (but for n_clips and code_version)."""
    attrs = [read_attrs(p) for p in paths]
    ref = attrs[0]
    ignore = {"n_clips", "code_version"}
    for path, other in zip(paths[1:], attrs[1:]):
        for key in sorted((set(ref) | set(other)) - ignore):
            if ref.get(key) != other.get(key):
                raise CacheError(f"{path} differs from {paths[0]} in attribute '{key}': "
                                 f"{other.get(key)!r} vs {ref.get(key)!r}")
    return ref


def _agreed_labels(files: list[h5py.File], paths: list[Path]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The label columns and classes, the same in every shard."""
    label_columns, label_classes = label_meta(files[0], paths[0])
    for path, f in zip(paths[1:], files[1:]):
        cols, classes = label_meta(f, path)
        if cols != label_columns:
            raise CacheError(f"{path} differs from {paths[0]} in its labels: {cols} vs {label_columns}")
        if classes != label_classes:
            raise CacheError(f"{path} differs from {paths[0]} in its label classes: {classes} vs {label_classes}")
    return label_columns, label_classes


def _source_rows(files: list[h5py.File], paths: list[Path], order: Sequence[str] | None
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The merged file's ids, and for each the shard and the row it comes from; an id in two shards is refused."""
    ids = [f[IDS].asstr()[()] for f in files]
    shard_of = np.concatenate([np.full(len(x), s, np.int64) for s, x in enumerate(ids)])
    row_of = np.concatenate([np.arange(len(x), dtype=np.int64) for x in ids])
    all_ids = [str(i) for x in ids for i in x]
    position: dict[str, int] = {}
    for k, clip_id in enumerate(all_ids):
        if clip_id in position:
            j = position[clip_id]
            raise CacheError(f"{where(paths[shard_of[k]], int(row_of[k]), clip_id)}: duplicate File_ID (also "
                             f"{paths[shard_of[j]]}, row {int(row_of[j])})")
        position[clip_id] = k
    out_ids = sorted(all_ids) if order is None else _checked_order(order, all_ids, position)
    perm = np.array([position[i] for i in out_ids], dtype=np.int64)
    return out_ids, shard_of[perm], row_of[perm]


def _checked_order(order: Sequence[str], all_ids: list[str], position: Mapping[str, int]) -> list[str]:
    """`order` as a list, refused unless it names every id of the shards exactly once."""
    out_ids = [str(i) for i in order]
    seen: set[str] = set()
    for clip_id in out_ids:
        if clip_id not in position:
            raise CacheError(f"order lists id '{clip_id}', which is in none of the shards")
        if clip_id in seen:
            raise CacheError(f"order lists id '{clip_id}' twice")
        seen.add(clip_id)
    if len(out_ids) != len(all_ids):
        missing = next(i for i in all_ids if i not in seen)
        raise CacheError(f"order lacks id '{missing}' (and {len(all_ids) - len(out_ids) - 1} more) "
                         f"that the shards hold")
    return out_ids


@dataclass
class _Shards:
    """The open shard files of a merge, with their small per-clip columns read whole."""

    files: list[h5py.File]
    layer_dims: dict[str, int]
    frame_layers: list[str]
    dtype: np.dtype
    splits: list[np.ndarray]
    n_frames: list[np.ndarray]
    labels: dict[str, list[np.ndarray]]
    offsets: list[np.ndarray]          # FRAME_OFFSETS of each shard (empty without frame layers)
    clip_info: dict[str, list[np.ndarray]]

    @classmethod
    def read(cls, files: list[h5py.File], ref: Mapping[str, Any], label_columns: Mapping[str, Any]) -> "_Shards":
        frame_layers = list(ref["frame_layers"])
        return cls(files=files, layer_dims=dict(ref["layer_dims"]), frame_layers=frame_layers,
                   dtype=np.dtype(ref["dtype"]), splits=[f[SPLITS_DS].asstr()[()] for f in files],
                   n_frames=[f[N_FRAMES][()] for f in files],
                   labels={name: [f[LABELS][name][()] for f in files] for name in label_columns},
                   offsets=[f[FRAME_OFFSETS][()] for f in files] if frame_layers else [],
                   clip_info={name: [_clip_info(f, name) for f in files] for name in _agreed_clip_info(files)})

    def rows(self, shard: np.ndarray, row: np.ndarray) -> dict[str, Any]:
        """CacheWriter.append's arguments (but the ids) for the clips at (shard[k], row[k])."""
        n = len(shard)
        pooled = {layer: np.empty((n, dim), self.dtype) for layer, dim in self.layer_dims.items()}
        frames: dict[str, list[Any]] = {layer: [None] * n for layer in self.frame_layers}
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = row[sel]
            for layer in self.layer_dims:
                pooled[layer][sel] = read_rows(self.files[s][POOLED][layer], rows)
            for layer in self.frame_layers:
                parts = read_ranges(self.files[s][FRAMES][layer], self.offsets[s][rows], self.offsets[s][rows + 1])
                for k, part in zip(sel, parts):
                    frames[layer][k] = part
        pairs = list(zip(shard, row))
        return {"splits": [str(self.splits[s][r]) for s, r in pairs],
                "labels": {name: np.stack([values[s][r] for s, r in pairs]).reshape(n, -1)
                           for name, values in self.labels.items()},
                "n_frames": np.array([self.n_frames[s][r] for s, r in pairs], dtype=np.int32),
                "pooled": pooled, "frames": frames if self.frame_layers else None,
                "clip_info": {name: [values[s][r] for s, r in pairs] for name, values in self.clip_info.items()}}


def _agreed_clip_info(files: list[h5py.File]) -> list[str]:
    """The clip_info names of the shards, which must be the same in every one."""
    names = [sorted(f[CLIP_INFO]) if CLIP_INFO in f else [] for f in files]
    for f, other in zip(files[1:], names[1:]):
        if other != names[0]:
            raise CacheError(f"{f.filename} differs from {files[0].filename} in its clip_info: {other} vs {names[0]}")
    return names[0]


def _clip_info(f: h5py.File, name: str) -> np.ndarray:
    ds = f[CLIP_INFO][name]
    return ds.asstr()[()] if CLIP_INFO_KINDS.get(name) == "text" else ds[()]


def _block_rows(shards: _Shards, n_total: int, chunk_rows: int) -> int:
    """Clips per merge step: at most `chunk_rows`, and about MERGE_BLOCK_BYTES of features."""
    itemsize = shards.dtype.itemsize
    per_clip = sum(shards.layer_dims.values()) * itemsize
    if shards.frame_layers:
        total_frames = sum(int(o[-1]) for o in shards.offsets)
        per_clip += (total_frames / max(1, n_total)) * sum(shards.layer_dims[x] for x in shards.frame_layers) \
            * itemsize
    return int(max(1, min(chunk_rows, MERGE_BLOCK_BYTES // max(1.0, per_clip))))
