"""Fixed-length clips of a corpus as a torch Dataset, and the collate function that batches them.

Every clip is cut or zero-padded to the same length (2.5 s by default) with a sample mask, so a batch is one
dense tensor and a clip's features never depend on its batch-mates (see `extract.backbone`). Training crops
are random but reproducible: the window of clip i in epoch e comes from a generator seeded by (seed, e, i),
so it is the same whatever the number of processes, workers or the batch a clip lands in, and a resumed run
sees the same crops as an uninterrupted one. Evaluation and dumping take the first window (deterministic).
From the store, where a clip's length is known before it is read, that window's start is computed without
building the generator (`CropSeeds`: the same integer `np.random.default_rng([seed, epoch, row])` draws, at a
tenth of the cost of building it).

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


# np.random.SeedSequence's constants (numpy/random/bit_generator.pyx) and PCG64's 128-bit LCG multiplier
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_M32, _M64, _M128 = (1 << 32) - 1, (1 << 64) - 1, (1 << 128) - 1


class CropSeeds:
    """The training crop starts of one epoch, equal to `crop_start(length, n, np.random.default_rng([seed, epoch,
    row]))` without building a Generator per clip (9-10 us each, a third of a store item).

    `default_rng([seed, epoch, row])` is PCG64 seeded by SeedSequence([seed, epoch, row]), and a crop start is its
    first `integers(0, span)`. Here the SeedSequence hashing (uint32 arithmetic) runs vectorised over every row
    of the epoch at once (0.15 us a row), and a row's start comes from its four seed words in a few Python-int
    steps: PCG64's seeding, one 128-bit LCG step, the XSL-RR output and Lemire's bounded draw on its low 32 bits.
    Where that draw would be rejected (a chance of span / 2^32), where a number is outside [0, 2^32), or where
    this numpy's generator does not give the same start for a probe row (checked once per epoch), the generator
    itself is built: the result is always the generator's."""

    def __init__(self, seed: int, epoch: int, rows: np.ndarray) -> None:
        self.seed, self.epoch = int(seed), int(epoch)
        rows = np.asarray(rows, dtype=np.int64)
        self.words: np.ndarray | None = None
        if rows.size and 0 <= min(self.seed, self.epoch, int(rows.min())) \
                and max(self.seed, self.epoch, int(rows.max())) <= _M32:
            self.words = _seed_words(self.seed, self.epoch, rows.astype(np.uint64))
            if not self._agrees(int(rows[0])):
                self.words = None

    def _agrees(self, probe: int) -> bool:
        """Whether this numpy's generator gives rows[0] = `probe` the seed words and starts computed here."""
        expected = np.random.SeedSequence([self.seed, self.epoch, probe]).generate_state(4, np.uint64)
        if not np.array_equal(self.words[0], expected):
            return False
        for length in (2, 48_000, 1 << 31):
            drawn = self._drawn(0, length, 1)
            if drawn is not None and drawn != crop_start(length, 1, self._generator(probe)):
                return False
        return True

    def _generator(self, row: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, row])

    def start(self, k: int, row: int, length: int, n_samples: int) -> int:
        """The crop start of rows[k] (= `row`), a clip of `length` samples, for a window of `n_samples`."""
        if length <= n_samples:
            return 0                     # crop_start draws nothing that changes the start then
        start = self._drawn(k, length, n_samples) if self.words is not None else None
        return crop_start(length, n_samples, self._generator(row)) if start is None else start

    def _drawn(self, k: int, length: int, n_samples: int) -> int | None:
        span = length - n_samples + 1
        if span > _M32:
            return None                  # numpy's 64-bit draw, not this one
        s0, s1, i0, i1 = self.words[k].tolist()
        inc = ((((i0 << 64) | i1) << 1) | 1) & _M128                          # pcg_setseq_128_srandom_r
        state = (((inc + ((s0 << 64) | s1)) * _PCG_MULT + inc) * _PCG_MULT + inc) & _M128   # ... then one step
        rot, x = state >> 122, ((state >> 64) ^ state) & _M64                 # XSL-RR output
        m = (((x >> rot) | (x << (64 - rot))) & _M32) * span                   # Lemire on the low 32 bits
        if (m & _M32) < span and (m & _M32) < ((1 << 32) - span) % span:
            return None                  # numpy would draw again
        return m >> 32


def _seed_words(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """SeedSequence([seed, epoch, row]).generate_state(4, np.uint64) for every row: [len(rows), 4] uint64."""
    m32, shift = np.uint64(_M32), np.uint64(16)
    entropy = [np.full(rows.shape, seed, np.uint64), np.full(rows.shape, epoch, np.uint64), rows,
               np.zeros(rows.shape, np.uint64)]          # a pool of 4 words, the fourth hashed from 0
    h = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal h
        value = value ^ np.uint64(h)
        h = (h * _MULT_A) & _M32
        value = (value * np.uint64(h)) & m32
        return value ^ (value >> shift)

    pool = [hashmix(word) for word in entropy]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                mixed = (np.uint64(_MIX_L) * pool[dst] - np.uint64(_MIX_R) * hashmix(pool[src])) & m32
                pool[dst] = mixed ^ (mixed >> shift)
    h, words = _INIT_B, []
    for i in range(8):
        value = pool[i % 4] ^ np.uint64(h)
        h = (h * _MULT_B) & _M32
        value = (value * np.uint64(h)) & m32
        words.append(value ^ (value >> shift))
    return np.stack([words[2 * j] | (words[2 * j + 1] << np.uint64(32)) for j in range(4)], axis=1)


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
        self._seeds: CropSeeds | None = None      # the store's crop starts of self.epoch, made at its first item

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of `epoch` (accelerate's DataLoader forwards its set_epoch here)."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:      # a DataLoader worker makes its own crop seeds
        return {**self.__dict__, "_seeds": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        row = int(self.rows[k])
        clip_id = self.corpus.ids[row]
        n = self.n_samples
        if self.store is not None:   # only the window is read: the same crop as from the whole clip
            start = 0
            if self.train:
                if self._seeds is None or self._seeds.epoch != self.epoch:
                    self._seeds = CropSeeds(self.seed, self.epoch, self.rows)
                start = self._seeds.start(k, row, self.store.length(clip_id), n)
            clip = self.store.wave(clip_id, start, start + n)          # a fresh float32 array of its own
            clip, mask = (clip, np.ones(n, dtype=bool)) if len(clip) == n else crop_or_pad(clip, n)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, row]) if self.train else None
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
