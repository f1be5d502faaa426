"""The decoded-audio store: every clip of a corpus decoded once to 16 kHz mono, in one HDF5 file.

Stage 1 reads each clip once per epoch; decoding and resampling it every time (10 ms for a 48 kHz clip here)
leaves a GPU waiting, and over 30 epochs decodes every clip 30 times. `avb corpus decode` does it once:

    DIR/audio-16k.h5   /audio           1-D, every clip's samples one after another (contiguous, uncompressed)
                       /offsets         int64 [N + 1]: clip i is audio[offsets[i]:offsets[i + 1]]
                       /ids             the corpus ids, in its order
                       /source_size     int64 [N]: each source file's size in bytes when it was decoded
                       /source_mtime_ns int64 [N]: and its modification time
                       attrs: format, sample_rate, dtype, dtype_reason, complete

Samples are int16 when every source is 16-bit PCM, mono, at 16 kHz: the decoder's float is then int16 / 32768
exactly, so the store is lossless at half the size of float32. Otherwise float32, which is what the decoder
returns, so the store is lossless then too (float16 would halve it again at about -66 dB of rounding noise,
which would make the dump from the store differ from the dump from the files). Either way a clip read from the
store equals `load_audio` of its file, and so does every crop and every dumped feature (tested).

A store is used only while it matches the corpus: the same ids, and for every clip the size and modification
time its file had when decoded. Anything else is refused in one line naming the first differing clip
(`avb corpus decode --rebuild` remakes it, `--no-decoded-audio` ignores it). Clips are written into
`.audio-16k.h5.partial` beside it (chunked, so it can grow), and a killed decode resumes from the clips already
there. When every clip is in, /audio is copied out contiguous into the store, written under a temporary name
and renamed into place; so every process and DataLoader worker memory-maps it read-only, and a training crop
reads only its window.

Under `accelerate launch --num_processes N -m extract.decode` (any process with WORLD_SIZE > 1) the processes
meet over gloo (the decode uses no GPU): rank 0 takes the store's lock, decodes and writes (resuming as above),
and the others wait for it in one collective, then open the finished store and check it against the corpus;
the outcome is gathered, so every rank either goes on or stops with a one-line error (rank 0's own, relayed to
the others, or that of the first rank that could not use the store). No rank but 0 ever writes.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from cache.command_kit.errors import AvbError
from extract.audio import SAMPLE_RATE, AudioError, load_audio

STORE_FILE = "audio-16k.h5"
STORE_FORMAT = 1
CHUNK = 1 << 18                  # samples per HDF5 chunk of /audio (512 KiB of int16)
# Under `accelerate launch` the other ranks wait for rank 0's whole decode in one collective: hours for a big
# corpus, so not the default 30 minutes.
WAIT_FOR_RANK_0 = timedelta(days=2)


class DecodedAudioError(AvbError):
    """A decoded-audio store that cannot be used or written; one line naming the file and the clip."""


def default_store(corpus: Any) -> Path:
    return Path(corpus.root) / STORE_FILE


def source_stats(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(size in bytes, modification time in ns) of every file; a missing file is named."""
    sizes = np.zeros(len(paths), dtype=np.int64)
    mtimes = np.zeros(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError as err:
            raise AudioError(f"{path}: cannot read ({err.strerror or err})") from None
        sizes[i], mtimes[i] = stat.st_size, stat.st_mtime_ns
    return sizes, mtimes


def _lossless_int16(paths: Sequence[Path]) -> bool:
    """Every source is 16-bit PCM, mono, 16 kHz: its samples fit int16 exactly."""
    import soundfile

    for path in paths:
        try:
            info = soundfile.info(str(path))
        except Exception:  # noqa: BLE001 -- the decode itself then gives the file's one-line error
            return False
        if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
            return False
    return True


# ---------------------------------------------------------------------------------------------- reading

class DecodedAudio:
    """A store, opened read-only in each process that reads it (h5py handles do not survive a fork)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != STORE_FORMAT or not f.attrs.get("complete", False):
                    raise DecodedAudioError(f"{self.path}: not a complete decoded-audio store of format "
                                            f"{STORE_FORMAT} (rebuild it: avb corpus decode --rebuild)")
                self.ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][()]]
                self.offsets = np.asarray(f["offsets"][()], dtype=np.int64)
                self.sizes = np.asarray(f["source_size"][()], dtype=np.int64)
                self.mtimes = np.asarray(f["source_mtime_ns"][()], dtype=np.int64)
                self.dtype = str(f.attrs["dtype"])
        except (OSError, KeyError) as err:
            raise DecodedAudioError(f"{self.path}: not a readable decoded-audio store ({err})") from None
        self.row = {clip: i for i, clip in enumerate(self.ids)}
        self._samples: np.ndarray | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:      # a DataLoader worker gets the index, not the mapping
        return {**self.__dict__, "_samples": None, "_pid": -1}

    def _audio(self) -> np.ndarray:
        """/audio as a read-only memory map (it is stored contiguous), made once per process."""
        if self._samples is None or self._pid != os.getpid():
            import h5py

            with h5py.File(self.path, "r") as f:
                ds = f["audio"]
                offset, shape, dtype = ds.id.get_offset(), ds.shape, ds.dtype
            if offset is None:      # an empty store: nothing was ever written
                self._samples = np.zeros(0, dtype=dtype)
            else:
                # a plain ndarray view of the map (it keeps the map alive): slicing a memmap subclass costs more
                mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
                self._samples = mapped.view(np.ndarray)
            self._pid = os.getpid()
        return self._samples

    def length(self, clip_id: str) -> int:
        i = self.row[clip_id]
        return int(self.offsets[i + 1] - self.offsets[i])

    def wave(self, clip_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Samples [start:stop] of clip `clip_id` as float32 at 16 kHz: equal to that slice of `load_audio` of
        its source file (only those samples are read), in a new array of its own."""
        i = self.row[clip_id]
        first, end = int(self.offsets[i]), int(self.offsets[i + 1])
        lo, hi = first + max(start, 0), end if stop is None else min(first + stop, end)
        samples = self._audio()[lo:max(lo, hi)]
        if self.dtype == "int16":
            wave = samples.astype(np.float32)
            wave *= np.float32(1.0 / 32768.0)      # = / 32768 exactly (a power of two), in place: one pass less
            return wave
        return np.array(samples, dtype=np.float32)

    def stale(self, corpus: Any) -> str | None:
        """None when the store matches the corpus, else what differs first (one clip, named)."""
        if self.ids != list(corpus.ids):
            mine, theirs = set(self.ids), set(corpus.ids)
            added = [c for c in corpus.ids if c not in mine]
            if added:
                return f"clip {added[0]} is in the corpus but not in the store ({len(added)} such)"
            removed = [c for c in self.ids if c not in theirs]
            return f"clip {removed[0]} is in the store but no longer in the corpus ({len(removed)} such)" \
                if removed else "the clips are in another order"
        paths = [corpus.audio_path(c) for c in corpus.ids]
        sizes, mtimes = source_stats(paths)
        changed = np.flatnonzero((sizes != self.sizes) | (mtimes != self.mtimes))
        if changed.size:
            i = int(changed[0])
            what = "size" if sizes[i] != self.sizes[i] else "modification time"
            return f"clip {corpus.ids[i]} changed since it was decoded ({paths[i]}: {what}; {changed.size} such)"
        return None


def open_store(corpus: Any, setting: str | None = "auto", *, say: Any = None) -> DecodedAudio | None:
    """The store fine-tuning and the dump read clips from, or None to decode the files.

    `setting`: "auto" (the corpus's DIR/audio-16k.h5 when present), "none", or a store's path (must exist).
    A store that does not match the corpus is refused in one line; `say(message)` hears which store is used."""
    if setting in (None, "", "none"):
        return None
    path = default_store(corpus) if setting == "auto" else Path(setting)
    if not path.is_file():
        if setting == "auto":
            return None
        raise DecodedAudioError(f"--decoded-audio {path}: no such file (avb corpus decode writes it)")
    store = DecodedAudio(path)
    why = store.stale(corpus)
    if why is not None:
        raise DecodedAudioError(f"{path} no longer matches the corpus: {why}; rebuild it (avb corpus decode "
                                "--rebuild) or pass --no-decoded-audio")
    if say is not None:
        say(f"reading clips from {path} ({len(store.ids)} clips decoded at 16 kHz, {store.dtype}); "
            "--no-decoded-audio decodes the files instead")
    return store


# ---------------------------------------------------------------------------------------------- writing

@dataclass
class DecodeSummary:
    path: Path
    clips: int
    samples: int
    dtype: str
    resumed_from: int
    skipped: bool = False      # already complete and fresh: nothing written
    world: int = 1             # processes of the launch; rank 0 alone wrote (or left alone) the store
    main: bool = True          # this process is rank 0


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def launched_processes() -> Any:
    """accelerate's state of a multi-process `accelerate launch` (over gloo: the decode uses no GPU), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=True, timeout=WAIT_FOR_RANK_0)


def decode_corpus(corpus: Any, out: str | os.PathLike | None = None, *, rebuild: bool = False,
                  progress: bool = True, ranks: Any = None) -> DecodeSummary:
    """Write (or finish, or leave alone) the store of `corpus`; see the module docstring.

    `ranks`: the processes of an `accelerate launch` (an accelerate PartialState or Accelerator), found by
    itself when WORLD_SIZE > 1: rank 0 decodes, the others wait and then check the finished store."""
    from cache.command_kit.lock import hold_output

    path = Path(out) if out else default_store(corpus)
    own = ranks is None
    ranks = launched_processes() if own else ranks
    if ranks is None or ranks.num_processes <= 1:
        with hold_output(path, is_file=True):
            return _decode(corpus, path, rebuild, progress)
    try:
        with hold_output(path, is_file=True, ranks=ranks):   # rank 0 takes it for all, or all stop
            return _decode_on_rank_0(corpus, path, rebuild, progress, ranks)
    finally:
        if own:                                               # the group this call formed
            ranks.destroy_process_group()


def _decode_on_rank_0(corpus: Any, path: Path, rebuild: bool, progress: bool, ranks: Any) -> DecodeSummary:
    """Rank 0 decodes; the others wait in the broadcast of its outcome, then open and check the store."""
    from accelerate.utils import broadcast_object_list, gather_object

    world, main = ranks.num_processes, ranks.is_main_process
    failure: BaseException | None = None
    outcome: list[Any] = [None, None]          # rank 0's summary, or the one line it failed with
    if main:
        try:
            outcome[0] = _decode(corpus, path, rebuild, progress)
        except BaseException as err:           # a signal too: the others must not wait for it forever
            failure, outcome[1] = err, _one_line(err)
    broadcast_object_list(outcome, from_process=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise DecodedAudioError(f"rank 0 of {world} processes, which decodes for all of them, stopped: {outcome[1]}")
    problems = gather_object([None if main else _unusable(corpus, path)])
    for rank, problem in enumerate(problems):
        if problem is not None:
            raise DecodedAudioError(f"rank {rank} of {world} processes cannot use the store rank 0 wrote: {problem}")
    return dataclasses.replace(outcome[0], world=world, main=main)


def _one_line(err: BaseException) -> str:
    from cache.command_kit.write_errors import describe

    if isinstance(err, AvbError):
        return str(err)
    if isinstance(err, OSError):
        return describe(err)
    return f"{type(err).__name__}: {err}"


def _unusable(corpus: Any, path: Path) -> str | None:
    """Why the store rank 0 finished cannot be read here as the corpus's (None: it can)."""
    try:
        store = DecodedAudio(path)
        samples = store._audio().shape[0]
    except (DecodedAudioError, OSError, ValueError) as err:
        return str(err)
    if len(store.offsets) != len(store.ids) + 1 or int(store.offsets[-1]) != samples:
        return f"{path}: its offsets end at sample {int(store.offsets[-1])} but /audio holds {samples}"
    return store.stale(corpus)


def _decode(corpus: Any, path: Path, rebuild: bool, progress: bool) -> DecodeSummary:
    """The decode itself, in the one process that holds the store's lock."""
    import h5py
    from tqdm.auto import tqdm

    paths = [corpus.audio_path(c) for c in corpus.ids]
    if path.is_file() and not rebuild:
        try:
            store = DecodedAudio(path)
            why = store.stale(corpus)
        except DecodedAudioError:
            why = "unreadable"
        if why is None:
            return DecodeSummary(path, len(paths), 0, store.dtype, len(paths), skipped=True)
        raise DecodedAudioError(f"{path} no longer matches the corpus: {why}; pass --rebuild to decode it "
                                "again")
    sizes, mtimes = source_stats(paths)
    partial = partial_path(path)
    start = _resumable(partial, corpus.ids, sizes, mtimes) if not rebuild else 0
    if start == 0:
        partial.unlink(missing_ok=True)
        dtype = "int16" if _lossless_int16(paths) else "float32"
        _create(partial, corpus.ids, sizes, mtimes, dtype)
    with h5py.File(partial, "r+") as f:
        dtype, audio, offsets = str(f.attrs["dtype"]), f["audio"], f["offsets"]
        end = int(offsets[start])
        bar = tqdm(total=len(paths), initial=start, desc=f"decode {path.name}", unit="clip",
                   disable=not progress)
        for i in range(start, len(paths)):
            wave = _samples(paths[i], dtype)
            audio.resize((end + len(wave),))
            audio[end:end + len(wave)] = wave
            end += len(wave)
            offsets[i + 1] = end
            f.attrs["done"] = i + 1       # what a resumed decode trusts
            if (i + 1) % 1000 == 0:
                f.flush()                 # so a kill loses at most the last thousand clips
            bar.update(1)
        bar.close()
    _finalise(partial, path)
    return DecodeSummary(path, len(paths), end, dtype, start)


def _finalise(partial: Path, path: Path, block: int = 1 << 24) -> None:
    """The complete store: the partial file's datasets with /audio laid out contiguous (so readers memory-map
    it), copied in blocks of `block` samples under a temporary name and renamed into place."""
    import h5py

    from cache.command_kit.atomic import atomic_path

    with atomic_path(path, suffix=".h5") as tmp, h5py.File(partial, "r") as src, h5py.File(tmp, "w") as dst:
        audio = src["audio"]
        out = dst.create_dataset("audio", shape=audio.shape, dtype=audio.dtype)     # contiguous
        for lo in range(0, audio.shape[0], block):
            out[lo:lo + block] = audio[lo:lo + block]
        for name in ("offsets", "ids", "source_size", "source_mtime_ns"):
            src.copy(src[name], dst, name)
        dst.attrs.update(dict(src.attrs))
        dst.attrs["complete"] = True
    partial.unlink()


def _samples(path: Path, dtype: str) -> np.ndarray:
    """The decoder's output (its checks and one-line errors), as int16 where that is exact: 16-bit PCM decodes
    to k / 32768, which float32 holds exactly, so k comes back unchanged."""
    wave = load_audio(path)
    return np.round(wave * np.float32(32768.0)).astype(np.int16) if dtype == "int16" else wave


def _create(partial: Path, ids: Sequence[str], sizes: np.ndarray, mtimes: np.ndarray, dtype: str) -> None:
    import h5py

    with h5py.File(partial, "w") as f:
        f.create_dataset("audio", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK,))
        f.create_dataset("offsets", data=np.zeros(len(ids) + 1, dtype=np.int64))
        f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("source_size", data=sizes)
        f.create_dataset("source_mtime_ns", data=mtimes)
        f.attrs.update(format=STORE_FORMAT, sample_rate=SAMPLE_RATE, dtype=dtype, complete=False, done=0,
                       dtype_reason="every source is 16-bit PCM mono at 16 kHz: int16 is exact" if dtype == "int16"
                       else "some source is not 16-bit PCM mono at 16 kHz: float32, the decoder's own output")


def _resumable(partial: Path, ids: Sequence[str], sizes: np.ndarray, mtimes: np.ndarray) -> int:
    """How many clips of a partial store from a killed decode can be kept (0: start over)."""
    import h5py

    if not partial.is_file():
        return 0
    try:
        with h5py.File(partial, "r") as f:
            same = ([s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][()]] == list(ids)
                    and np.array_equal(f["source_size"][()], sizes)
                    and np.array_equal(f["source_mtime_ns"][()], mtimes))
            return int(f.attrs.get("done", 0)) if same else 0
    except (OSError, KeyError):
        return 0


def store_status(corpus: Any) -> dict[str, Any] | None:
    """What `avb corpus check` says of the corpus's store: None when there is none."""
    path = default_store(corpus)
    if not path.is_file():
        return None
    try:
        store = DecodedAudio(path)
        why = store.stale(corpus)
    except (DecodedAudioError, AudioError) as err:
        return {"path": str(path), "fresh": False, "why": str(err)}
    return {"path": str(path), "fresh": why is None, "why": why, "clips": len(store.ids), "dtype": store.dtype}
