"""Fixed-length clips of a corpus as a torch Dataset, and the collate function that batches them.

Every clip is cut or zero-padded to the same length (2.5 s by default) with a sample mask, so a batch is one
dense tensor and a clip's features never depend on its batch-mates (see `extract.backbone`). Training crops
are random but reproducible: the window of clip i in epoch e comes from a generator seeded by (seed, e, i),
so it is the same whatever the number of processes, workers or the batch a clip lands in, and a resumed run
sees the same crops as an uninterrupted one. Evaluation and dumping take the first window (deterministic).

A clip comes from the corpus's decoded-audio store when one is given (`extract.decoded_audio`: decoded once,
equal to decoding the file), else from its file. `loader_options` sizes the DataLoader around it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cache.command_kit.errors import AvbError
from extract.audio import SAMPLE_RATE, crop_or_pad, crop_start, load_audio
from extract.corpus import Corpus
from extract.run_config import AUTO_WORKERS
from heads.names import CLIP_SECONDS


class ClipError(AvbError):
    """A clip length that cannot work."""


def clip_samples(clip_seconds: float) -> int:
    """Samples in one clip of `clip_seconds` at 16 kHz."""
    n = int(round(float(clip_seconds) * SAMPLE_RATE))
    if n < 1:
        raise ClipError(f"clip_seconds must be positive, got {clip_seconds}")
    return n


class ClipDataset(Dataset):
    """Clips of `corpus` at row positions `rows`; item k is corpus row rows[k].

    An item is {"wave": float32 [S], "mask": bool [S], "row": int64 scalar, "labels": {task: float32 [label_dim]}}.
    """

    def __init__(
        self,
        corpus: Corpus,
        rows: Sequence[int] | np.ndarray,
        *,
        clip_seconds: float = CLIP_SECONDS,
        train: bool = False,
        seed: int = 0,
        store: Any = None,
    ) -> None:
        self.corpus = corpus
        self.store = store          # extract.decoded_audio.DecodedAudio, or None: decode the files
        self.rows = np.asarray(rows, dtype=np.int64)
        self.n_samples = clip_samples(clip_seconds)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of `epoch` (accelerate's DataLoader forwards its set_epoch here)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        row = int(self.rows[k])
        clip_id = self.corpus.ids[row]
        n = self.n_samples
        rng = np.random.default_rng([self.seed, self.epoch, row]) if self.train else None
        if self.store is not None:   # only the window is read: the same crop as from the whole clip
            start = crop_start(self.store.length(clip_id), n, rng)
            clip = self.store.wave(clip_id, start, start + n)          # a fresh float32 array of its own
            clip, mask = (clip, np.ones(n, dtype=bool)) if len(clip) == n else crop_or_pad(clip, n)
        else:
            clip, mask = crop_or_pad(load_audio(self.corpus.audio_path(clip_id)), n, rng)
        return {
            "wave": torch.from_numpy(clip),
            "mask": torch.from_numpy(mask),
            "row": torch.from_numpy(np.array(row, dtype=np.int64)),     # a 0-d tensor (torch.tensor: 4x slower)
            "labels": {task: torch.from_numpy(values[row]) for task, values in self.corpus.labels.items()},
        }


def default_workers(device: Any) -> int:
    """DataLoader workers when --num-workers is not given. On a GPU: this process's share of the cores (under
    `accelerate launch` LOCAL_WORLD_SIZE processes share them) less the one driving the GPU, at most 8, so
    loading overlaps the GPU's step. On a CPU run: 0, because the model's own threads use every core and workers
    would compete with them for the same cores."""
    if getattr(device, "type", str(device)) != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(local, 1) - 1))


def loader_options(num_workers: int, device: Any) -> dict[str, Any]:
    """DataLoader keyword arguments: the workers (AUTO_WORKERS: `default_workers`), kept alive across epochs
    and prefetching, and pinned memory when batches go to a GPU."""
    workers = default_workers(device) if num_workers == AUTO_WORKERS else int(num_workers)
    options: dict[str, Any] = {"num_workers": workers}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    if getattr(device, "type", str(device)) == "cuda":
        options["pin_memory"] = True
    return options


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack items into {"waves" [B, S], "mask" [B, S], "rows" [B], "labels" {task: [B, label_dim]}}."""
    return {
        "waves": torch.stack([it["wave"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "rows": torch.stack([it["row"] for it in items]),
        "labels": {task: torch.stack([it["labels"][task] for it in items]) for task in items[0]["labels"]},
    }


class EpochShuffleSampler(Sampler[int]):
    """A permutation of range(n) seeded by (seed, epoch): the same order in every process and on resume.

    accelerate splits the resulting batches between processes; because the order depends only on the seed and
    the epoch, every rank agrees on it without communication.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        return iter(order.tolist())
