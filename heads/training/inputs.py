"""What a joint training step reads: cached features and labels as tensors on the training device, each
run's shuffled batches, and the one padding of frame-level inputs.

Everything here lives on the training device (`--device`), so a step gathers its batch without a host round
trip: features stay in the cache's dtype (on the CPU they share the cache's memory) and become float32 as a
batch is gathered; all tasks' labels sit in one tensor, so a batch's targets are one gather.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cache.command_kit.errors import AvbError, where
from heads.model.architectures import HeadInputs
from heads.tasks import TaskSet

if TYPE_CHECKING:
    from cache.reader import CacheData

# Evaluation chunks hold about this many (row, run) pairs: the activations grow with rows x runs, and on CPU
# mid-sized chunks are also the fastest (measured with 12 runs: 341-row chunks evaluate VANILLA 1.5x and
# BRANCH 1.35x faster than 2048-row chunks, with a tenth of the memory: 0.26 GB instead of 1.2 GB for BRANCH).
EVAL_RUN_ROWS = 4096
EVAL_RUN_ROWS_FRAMES = 256  # the same with frame-level inputs ([B, T, D] per layer and run)
EVAL_RUN_ROWS_DEVICE = 16384  # on an accelerator: larger chunks, fewer launches
FEATURE_CHECK_ROWS = 8192   # rows per block when checking the features for NaN/inf (bounds the temporary)


class TrainingError(AvbError):
    """Bad configs or data for a training run, or a run that diverged (non-finite loss)."""


def check_features(cache: CacheData, layers: Sequence[str], rows: np.ndarray) -> None:
    """Fail before training on NaN/inf features: they would only surface later as a NaN loss."""
    for layer in layers:
        if layer not in cache.pooled:
            raise TrainingError(
                f"cache has no pooled layer {layer!r} loaded (loaded: {', '.join(cache.pooled) or 'none'})")
        data = cache.pooled[layer]
        # In blocks and in the stored dtype: a float32 copy of a whole HUME-VB layer would be 180 MB.
        bad = np.concatenate([~np.isfinite(data[rows[i:i + FEATURE_CHECK_ROWS]]).all(axis=1)
                              for i in range(0, len(rows), FEATURE_CHECK_ROWS)] or [np.zeros(0, bool)])
        if bad.any():
            first = rows[np.flatnonzero(bad)[0]]
            file_row = int(cache.rows[first]) if getattr(cache, "rows", None) is not None else int(first)
            raise TrainingError(
                f"{where(cache.path, file_row, str(cache.ids[first]), f'layer {layer!r}')}: non-finite features "
                f"({cache.splits[first]!s} clip; {int(bad.sum())} clip(s) in all)")


# ------------------------------------------------------------------------------------------- batching

class Features:
    """Cached inputs as torch tensors on the training device, kept in the cache's dtype (batches become float32
    as they are gathered). On the CPU they share the cache's memory (no copy)."""

    def __init__(self, cache: CacheData, layers: Sequence[str], frames: Any = None,
                 frame_layers: Sequence[str] = (), n_runs: int = 1, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.pooled = {layer: torch.from_numpy(np.ascontiguousarray(cache.pooled[layer])).to(self.device)
                       for layer in layers}
        self.frames = frames
        self.frame_layers = list(frame_layers)
        file_rows = getattr(cache, "rows", None)  # FrameReader indexes file rows, not loaded rows
        self.file_rows = np.arange(len(cache.ids)) if file_rows is None else np.asarray(file_rows, np.int64)
        if self.frame_layers:
            if frames is None:
                raise TrainingError(
                    f"this head attends over frames of {', '.join(self.frame_layers)}; pass a frame reader "
                    "(a cache dumped with frame-level layers)")
            missing = [layer for layer in self.frame_layers if layer not in frames.layers]
            if missing:
                raise TrainingError(f"the frame reader has no frames for {', '.join(missing)} "
                                    f"(it has {', '.join(frames.layers)})")
        if self.frame_layers:
            budget = EVAL_RUN_ROWS_FRAMES
        else:
            budget = EVAL_RUN_ROWS if self.device.type == "cpu" else EVAL_RUN_ROWS_DEVICE
        self.eval_batch = max(8, budget // max(1, int(n_runs)))

    def batch(self, rows: torch.Tensor) -> HeadInputs:
        """Inputs for run-specific rows [R, B] (a tensor on the device) -> HeadInputs with [R, B, ...] tensors."""
        r, b = rows.shape
        flat = rows.reshape(-1)
        pooled = {k: v.index_select(0, flat).float().view(r, b, -1) for k, v in self.pooled.items()}
        frames, mask = self._frames(flat.cpu().numpy()) if self.frame_layers else (None, None)
        if frames is not None:
            frames = {k: v.reshape(r, b, *v.shape[1:]) for k, v in frames.items()}
            mask = mask.reshape(r, b, -1)
        return HeadInputs(pooled=pooled, frames=frames, frame_mask=mask)

    def shared(self, rows: np.ndarray) -> HeadInputs:
        """Inputs for rows shared by all runs: [B] -> [1, B, ...] (the head broadcasts a run dim of 1)."""
        idx = torch.from_numpy(rows).to(self.device)
        pooled = {k: v.index_select(0, idx).float().unsqueeze(0) for k, v in self.pooled.items()}
        frames, mask = self._frames(rows)
        if frames is not None:
            frames = {k: v.unsqueeze(0) for k, v in frames.items()}
            mask = mask.unsqueeze(0)
        return HeadInputs(pooled=pooled, frames=frames, frame_mask=mask)

    def _frames(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """Frames of `rows` zero-padded to the longest clip of the batch, with the valid-frame mask, on the device.

        Each distinct clip is read once: runs with the same seed share their shuffle, so a joint batch of
        4 weightings x 3 seeds holds each clip 4 times.
        """
        if not self.frame_layers:
            return None, None
        uniq, inverse = np.unique(rows, return_inverse=True)
        if len(uniq) < len(rows):
            frames, mask = self._frames(uniq)
            index = torch.from_numpy(inverse.reshape(-1)).to(self.device)
            return {k: v.index_select(0, index) for k, v in frames.items()}, mask.index_select(0, index)
        return pad_frames(self.frames.get(self.file_rows[rows]), self.frame_layers, self.device)


def pad_frames(frames: dict[str, Sequence[Any]], layers: Sequence[str] | None = None,
               device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Ragged per-clip frames (layer -> one [T_i, D] array or tensor per clip) -> float32 [B, T, D] per layer,
    zero-padded to the longest clip (at least 1 frame), and the [B, T] valid-frame mask, on `device`.

    The one padding of frames: training batches (`Features`) and `avb predict` go through it."""
    layers = list(frames) if layers is None else list(layers)
    lengths = np.array([len(x) for x in frames[layers[0]]], dtype=np.int64)
    t_max = max(1, int(lengths.max()) if len(lengths) else 1)
    out = {}
    for layer in layers:
        clips = [c.detach().float().cpu().numpy() if isinstance(c, torch.Tensor) else c for c in frames[layer]]
        arr = np.zeros((len(clips), t_max, clips[0].shape[-1] if clips else 0), dtype=np.float32)
        for i, clip in enumerate(clips):
            arr[i, :len(clip)] = clip
        out[layer] = torch.from_numpy(arr).to(device)
    mask = torch.from_numpy(np.arange(t_max)[None, :] < lengths[:, None]).to(device)
    return out, mask


class Labels:
    """Every task's labels in one float32 tensor on the device, so a batch's targets are one gather."""

    def __init__(self, cache: CacheData, tasks: TaskSet, device: torch.device) -> None:
        self.names = tasks.names
        parts = [np.asarray(cache.labels[name], dtype=np.float32).reshape(len(cache.ids), -1) for name in self.names]
        self.widths = [p.shape[1] for p in parts]
        self.table = torch.from_numpy(np.concatenate(parts, axis=1)).to(device)

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Targets for run-specific rows [R, B] -> task -> [R, B, label_dim] (classification: class index as float)."""
        r, b = rows.shape
        values = self.table.index_select(0, rows.reshape(-1)).view(r, b, -1)
        return dict(zip(self.names, values.split(self.widths, dim=-1)))


def epoch_batches(seeds: Sequence[int], epoch: int, train_rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Per-run shuffles of the Train rows cut into batches: a list of [R, B] row indices into the cache.

    A last partial batch is kept when it has at least 2 rows (CCC needs two) and dropped otherwise.
    """
    perms = np.stack([train_rows[np.random.default_rng((int(s), epoch)).permutation(len(train_rows))]
                      for s in seeds])
    n_full, rest = divmod(len(train_rows), batch_size)
    batches = [perms[:, i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
    if rest >= 2:
        batches.append(perms[:, n_full * batch_size:])
    return batches


def device_batches(batches: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The epoch's batches as views of one index tensor moved to the device in a single copy."""
    if not batches:
        return []
    whole = torch.from_numpy(np.concatenate(batches, axis=1)).to(device)
    return list(whole.split([b.shape[1] for b in batches], dim=1))


