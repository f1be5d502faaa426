"""Audio in and out: any audio file libsndfile reads becomes 16 kHz mono float32, and clips become fixed-length
windows.

wav2vec2 checkpoints are trained on 16 kHz mono float audio in [-1, 1]; the A-VB files are 16 kHz mono WAVs in
practice, but users bring their own recordings to `avb predict`, so every format and encoding libsndfile decodes
(WAV in PCM, float, A-law, mu-law, ADPCM, GSM 6.10...; FLAC, OGG Vorbis/Opus, MP3, AIFF, CAF, ...), any sample
rate and any channel count are accepted here and nowhere else.

Every format is decoded by `soundfile` (libsndfile) as float64, which scales integer PCM exactly: int16 / 2**15,
24- and 32-bit / 2**31 (24-bit as a left-aligned int32, so the same as / 2**23), 8-bit (x - 128) / 128. A WAV's
RIFF header is still parsed by hand first (`wav_info`): libsndfile silently reads a truncated data chunk as a
shorter clip, so the truncation and malformed-header errors come from this check, and `corpus check` sizes tens
of thousands of WAVs without opening a decoder. Channels are averaged, then `scipy.signal.resample_poly`
(polyphase) brings the rate to 16 kHz.

Long recordings are read in bounded memory by `audio_windows`: block by block, each block resampled with enough
context on both sides, aligned to the resampler's polyphase period, that every window equals the same samples
sliced out of the whole-file decode.
"""
from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cache.command_kit.atomic import write_bytes_atomic
from cache.command_kit.errors import AvbError

SAMPLE_RATE = 16000
MAX_SECONDS = 60.0  # far beyond any vocal burst (A-VB max 9.96 s); guards against decoding a wrong file

# What a folder search picks up: the extensions of the formats in soundfile.available_formats() that hold
# recordings (libsndfile 1.2: WAV/WAVEX .wav .wave, RF64 .rf64, W64 .w64, FLAC .flac, OGG .ogg .oga .opus
# (Vorbis and Opus), MP3 .mp3 (libsndfile >= 1.1), AIFF .aiff .aif .aifc, AU .au .snd, CAF .caf). Left out: RAW
# (headerless: nothing to identify it by), MAT4/MAT5 and HTK (.mat / .htk are mostly numeric data or features,
# not audio), NIST .sph (corpora mostly store it shorten-compressed, which libsndfile cannot decode), and the
# instrument, sampler and legacy formats (XI, SDS, MPC2K, SVX, PAF, PVF, SD2, VOC, WVE, AVR, IRCAM .sf), whose
# extensions are ambiguous or rarely audio today. A file of those can still be named directly.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd",
    ".caf", ".w64", ".rf64",
})
_WAV_EXTENSIONS = (".wav", ".wave")  # these get the hand-parsed RIFF header check before libsndfile decodes

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_PCM_BITS = (8, 16, 24, 32)
_FLOAT_BITS = (32, 64)
# Names of common WAV format tags, for the error about an encoding libsndfile cannot decode.
_TAG_NAMES = {
    0x0002: "Microsoft ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0031: "GSM 6.10",
    0x0040: "G.721 ADPCM", 0x0050: "MPEG", 0x0055: "MPEG Layer III", 0x0092: "Dolby AC-3 SPDIF",
    0x0160: "WMA v1", 0x0161: "WMA", 0x0162: "WMA Pro", 0x0163: "WMA Lossless", 0x2000: "Dolby AC-3",
    0x2001: "DTS", 0x674F: "Ogg Vorbis", 0xF1AC: "FLAC",
}

# subtype -> (format tag, bits per sample)
SUBTYPES: dict[str, tuple[int, int]] = {
    "PCM_U8": (_PCM, 8),
    "PCM_16": (_PCM, 16),
    "PCM_24": (_PCM, 24),
    "PCM_32": (_PCM, 32),
    "FLOAT": (_FLOAT, 32),
    "DOUBLE": (_FLOAT, 64),
}
# The tail shared by the KSDATAFORMAT_SUBTYPE_* GUIDs; the first two bytes are the plain format tag.
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_RIFF_MAGICS = (b"RIFF", b"RIFX", b"RF64")  # RF64: the 64-bit WAV of long recordings (libsndfile has no BW64)


class AudioError(AvbError):
    """An audio file that cannot be used; the message is one line naming the file."""


class WindowError(AvbError, ValueError):
    """A window length or hop that cannot work; the message is one line worded for --window / --hop."""


class WavInfo(NamedTuple):
    sample_rate: int
    n_frames: int
    n_channels: int
    duration_s: float


class Window(NamedTuple):
    index: int
    start_s: float      # start in seconds (16 kHz sample index / 16000)
    end_s: float        # start_s + len(wave) / 16000 (the last window may be shorter than the others)
    wave: np.ndarray    # float32 mono 16 kHz


class _Header(NamedTuple):
    sample_rate: int
    n_channels: int
    format_tag: int          # 1 = PCM, 3 = IEEE float, ... (WAVE_FORMAT_EXTENSIBLE resolved to its sub-format)
    bits: int
    n_frames: int | None     # None for compressed encodings (A-law, ADPCM, ...): libsndfile gives their length


def _open_regular(path: Path) -> tuple[Any, int]:
    """(binary handle, size) of a regular, non-empty file, or the one-line AudioError saying why not."""
    try:
        if not path.is_file():  # before open(): a directory cannot be opened at all (IsADirectoryError)
            path.stat()         # FileNotFoundError for a missing path, else the path is a folder, a FIFO, ...
            raise AudioError(f"{path}: not a regular file")
        size = path.stat().st_size
        handle = open(path, "rb")  # noqa: SIM115 -- returned open; the caller closes it
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except OSError as err:
        raise AudioError(f"{path}: cannot open ({err.strerror or err})") from None
    if size == 0:
        handle.close()
        raise AudioError(f"{path}: empty file (0 bytes)")
    return handle, size


def _read_header(path: Path) -> _Header:
    """Parse the RIFF (or RF64) chunks up to the start of `data`; never reads the samples."""
    handle, size = _open_regular(path)
    with handle:
        head = handle.read(12)
        magic_ok = any(m.startswith(head[:4]) for m in _RIFF_MAGICS) and b"WAVE".startswith(head[8:12])
        if magic_ok and len(head) < 12:
            raise AudioError(f"{path}: truncated header ({size} bytes)")
        if not magic_ok:
            raise AudioError(f"{path}: not a WAV file (starts with {head[:4]!r}, expected b'RIFF'...b'WAVE')")
        endian = ">" if head[:4] == b"RIFX" else "<"
        fmt: tuple[int, int, int, int, int] | None = None
        ds64_data_size: int | None = None
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                what = "fmt" if fmt is None else "data"
                raise AudioError(f"{path}: truncated header (no {what} chunk)")
            chunk_id, chunk_size = chunk[:4], struct.unpack(endian + "I", chunk[4:])[0]
            if chunk_id == b"ds64":  # RF64: the 64-bit sizes whose 32-bit fields hold 0xFFFFFFFF
                body = handle.read(chunk_size)
                if len(body) < chunk_size or chunk_size < 24:
                    raise AudioError(f"{path}: truncated header (ds64 chunk of {len(body)} bytes)")
                ds64_data_size = struct.unpack("<Q", body[8:16])[0]
                if chunk_size % 2:
                    handle.seek(1, os.SEEK_CUR)
            elif chunk_id == b"fmt ":
                body = handle.read(chunk_size)
                if len(body) < chunk_size or chunk_size < 16:
                    raise AudioError(f"{path}: truncated header (fmt chunk of {len(body)} bytes)")
                tag, channels, rate, _, block_align, bits = struct.unpack(endian + "HHIIHH", body[:16])
                if tag == _EXTENSIBLE:
                    if chunk_size < 40:
                        raise AudioError(f"{path}: truncated header (WAVE_FORMAT_EXTENSIBLE fmt chunk too short)")
                    tag = struct.unpack(endian + "H", body[24:26])[0]
                fmt = (tag, channels, rate, block_align, bits)
                if chunk_size % 2:
                    handle.seek(1, os.SEEK_CUR)
            elif chunk_id == b"data":
                if fmt is None:
                    raise AudioError(f"{path}: malformed header (data chunk before fmt chunk)")
                if chunk_size == 0xFFFFFFFF and ds64_data_size is not None:
                    chunk_size = ds64_data_size
                data_start = handle.tell()
                break
            else:
                handle.seek(chunk_size + chunk_size % 2, os.SEEK_CUR)
    tag, channels, rate, block_align, bits = fmt
    if tag == _PCM and bits not in _PCM_BITS:
        raise AudioError(f"{path}: unsupported PCM bit depth {bits} (supported: 8, 16, 24, 32)")
    if tag == _FLOAT and bits not in _FLOAT_BITS:
        raise AudioError(f"{path}: unsupported float bit depth {bits} (supported: 32, 64)")
    plain = tag in (_PCM, _FLOAT)
    if channels < 1 or rate < 1 or block_align < 1 or (plain and block_align != channels * bits // 8):
        raise AudioError(f"{path}: malformed fmt chunk ({channels} channels, {rate} Hz, block align {block_align})")
    available = size - data_start
    if chunk_size > available:
        raise AudioError(f"{path}: truncated audio data (header declares {chunk_size} bytes, "
                         f"file holds {available})")
    if not plain:  # A-law, mu-law, ADPCM, GSM 6.10, ...: libsndfile decodes them (or says it cannot)
        return _Header(rate, channels, tag, bits, None)
    if chunk_size % block_align:  # a partial frame means a damaged file
        raise AudioError(f"{path}: malformed data chunk ({chunk_size} bytes is not a whole number of "
                         f"{block_align}-byte frames)")
    return _Header(rate, channels, tag, bits, chunk_size // block_align)


def _libsndfile_message(err: BaseException) -> str:
    """libsndfile's own words (without soundfile's "Error opening 'path': " prefix), on one line."""
    text = getattr(err, "error_string", None) or str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _codec_frames(path: Path, header: _Header) -> int:
    """The length of a compressed WAV encoding, from libsndfile; the one-line error if it cannot decode it."""
    import soundfile

    try:
        frames = int(soundfile.info(str(path)).frames)
    except Exception as err:  # noqa: BLE001 -- soundfile.LibsndfileError (a RuntimeError), TypeError, ...
        tag = header.format_tag
        name = _TAG_NAMES.get(tag, "unknown")
        raise AudioError(f"{path}: WAV encoding {name} (format tag {tag:#06x}) cannot be decoded "
                         f"(libsndfile: {_libsndfile_message(err)})") from None
    return max(frames, 0)


def wav_info(path: str | os.PathLike) -> WavInfo:
    """(sample_rate, n_frames, n_channels, duration_s) from the header alone -- cheap enough for a corpus (the
    length of a compressed encoding such as A-law or ADPCM comes from libsndfile's header read)."""
    path = Path(path)
    header = _read_header(path)
    frames = header.n_frames if header.n_frames is not None else _codec_frames(path, header)
    return WavInfo(header.sample_rate, frames, header.n_channels, frames / header.sample_rate)


def _is_wav(path: Path) -> bool:
    return path.suffix.lower() in _WAV_EXTENSIONS


def _soundfile_info(path: Path) -> Any:
    """soundfile's header for a non-WAV file, with the same one-line errors as the WAV reader."""
    _open_regular(path)[0].close()
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as err:  # noqa: BLE001 -- soundfile.LibsndfileError (a RuntimeError), TypeError, ...
        raise AudioError(f"{path}: not a readable audio file ({_libsndfile_message(err)})") from None
    if info.samplerate < 1 or info.channels < 1:
        raise AudioError(f"{path}: malformed header ({info.channels} channels, {info.samplerate} Hz)")
    return info


def audio_info(path: str | os.PathLike) -> WavInfo:
    """(sample_rate, n_frames, n_channels, duration_s) of any audio file from its header: `wav_info` for a
    .wav file, soundfile (libsndfile: FLAC, OGG, AIFF, ...) for the others."""
    path = Path(path)
    if _is_wav(path):
        return wav_info(path)
    info = _soundfile_info(path)
    frames = max(int(info.frames), 0)
    return WavInfo(int(info.samplerate), frames, int(info.channels), frames / info.samplerate)


def _ratio(rate: int) -> tuple[int, int]:
    """(up, down) of the polyphase resampler from `rate` to 16 kHz, in lowest terms."""
    g = math.gcd(int(rate), SAMPLE_RATE)
    return SAMPLE_RATE // g, int(rate) // g


def samples_at_16k(n_frames: int, sample_rate: int) -> int:
    """The length of `n_frames` at `sample_rate` after resampling to 16 kHz: resample_poly gives
    ceil(n * up / down)."""
    up, down = _ratio(sample_rate)
    return -(-int(n_frames) * up // down)


def n_samples_16k(path: str | os.PathLike) -> int:
    """len(load_audio(path, max_seconds=math.inf)) from the header alone, without decoding."""
    info = audio_info(path)
    return samples_at_16k(info.n_frames, info.sample_rate)


def _check_length(path: Path, n_frames: int, rate: int, max_seconds: float) -> None:
    if n_frames == 0:
        raise AudioError(f"{path}: no audio samples (0 frames)")
    duration = n_frames / rate
    if duration > max_seconds:
        raise AudioError(f"{path}: clip is {duration:.2f} s long, more than the {max_seconds:g} s maximum")


def load_audio(path: str | os.PathLike, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Decode any audio file to float32 mono at 16 kHz (channels averaged, polyphase resampling).

    A .wav file passes the RIFF header check first (`wav_info`'s errors); every format is then decoded by
    libsndfile. `max_seconds` refuses a clip longer than that before decoding it (math.inf: no limit; a long
    recording is better read in bounded memory by `audio_windows`)."""
    path = Path(path)
    info = audio_info(path)
    _check_length(path, info.n_frames, info.sample_rate, max_seconds)
    import soundfile

    try:
        # float64 keeps integer sources exact: int16 / 32768, 24/32-bit / 2**31, 8-bit (x - 128) / 128
        wave, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except Exception as err:  # noqa: BLE001 -- libsndfile's errors for a damaged stream
        what = "WAV" if _is_wav(path) else "audio"
        raise AudioError(f"{path}: unreadable {what} ({type(err).__name__}: {_libsndfile_message(err)})") from None
    if wave.shape[0] / rate > max_seconds:  # formats whose header does not give the length
        raise AudioError(f"{path}: clip is {wave.shape[0] / rate:.2f} s long, more than the {max_seconds:g} s "
                         f"maximum")
    return to_mono_16k(path, wave, int(rate))


def _mono(path: Path | str, block: np.ndarray, first_frame: int = 0) -> np.ndarray:
    """[n, channels] float64 -> [n] (channels averaged), refusing NaN and inf (frames counted from
    `first_frame`)."""
    wave = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
    if not np.isfinite(wave).all():
        bad = int(np.flatnonzero(~np.isfinite(wave))[0])
        raise AudioError(f"{path}: non-finite sample (NaN or inf) at frame {first_frame + bad}")
    return wave


def to_mono_16k(name: str | os.PathLike, wave: np.ndarray, rate: int) -> np.ndarray:
    """Float samples ([n] or [n, channels] at `rate`) -> float32 mono at 16 kHz, as every file is decoded:
    channels averaged, polyphase resampling. `name` (a path, or what names an array) starts the one-line
    AudioError for an empty or non-finite input."""
    from scipy.signal import resample_poly

    path = os.fspath(name)
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim not in (1, 2):
        raise AudioError(f"{path}: expected a waveform of shape [samples] or [samples, channels], got {wave.shape}")
    if int(rate) < 1:
        raise AudioError(f"{path}: sample rate must be positive, got {rate}")
    if wave.ndim == 1:
        wave = wave[:, None]
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples (0 frames)")
    wave = _mono(path, wave)
    if rate != SAMPLE_RATE:
        up, down = _ratio(rate)
        wave = resample_poly(wave, up, down)
    return np.ascontiguousarray(wave, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- long recordings

def window_starts(n_samples: int, window: int, hop: int) -> list[int]:
    """The start (16 kHz sample index) of every window of `window` samples every `hop` samples over
    `n_samples`: 1 + max(0, ceil((n_samples - window) / hop)) windows, so the last one reaches the end (and may
    be shorter than the others); a recording shorter than one window gives one short window. A bad window or
    hop raises WindowError worded in seconds for --window / --hop (a hop of 0 samples: "got 0")."""
    if window < 1:
        raise WindowError(f"--window must be a positive number of seconds, got {window / SAMPLE_RATE:g}")
    if not 1 <= hop <= window:
        raise WindowError(f"--hop must be > 0 and at most --window ({window / SAMPLE_RATE:g} s), got "
                          f"{hop / SAMPLE_RATE:g}")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    n = 1 + max(0, -(-(n_samples - window) // hop))
    return [k * hop for k in range(n)]


def window_samples(window_s: float, hop_s: float) -> tuple[int, int]:
    """(window, hop) in 16 kHz samples, or the one-line WindowError worded for --window / --hop."""
    window_s, hop_s = float(window_s), float(hop_s)
    if not (math.isfinite(window_s) and window_s > 0):
        raise WindowError(f"--window must be a positive number of seconds, got {window_s:g}")
    if not (math.isfinite(hop_s) and 0 < hop_s <= window_s):
        raise WindowError(f"--hop must be > 0 and at most --window ({window_s:g} s), got {hop_s:g}")
    window, hop = round(window_s * SAMPLE_RATE), round(hop_s * SAMPLE_RATE)
    if window < 1:
        raise WindowError(f"--window must be at least one 16 kHz sample (1/16000 s), got {window_s:g}")
    if hop < 1:
        raise WindowError(f"--hop must be at least one 16 kHz sample (1/16000 s), got {hop_s:g}")
    return window, hop


def audio_windows(path: str | os.PathLike, window_s: float, hop_s: float, *,
                  block_s: float = 30.0) -> Iterator[Window]:
    """The windows of `window_s` seconds every `hop_s` seconds (`window_starts`) of a recording of any length,
    read block by block: memory is bounded by `block_s` (and one window), not by the file.

    Window k equals load_audio(path, max_seconds=math.inf)[start:start + window] (within float rounding: each
    block is resampled with the filter's full context on both sides, starting on a polyphase period, so every
    output sample is the same sum of the same input samples). The file's checks run before the first window:
    the errors are load_audio's, with no maximum length.
    """
    window, hop = window_samples(window_s, hop_s)
    if not (math.isfinite(block_s) and block_s > 0):
        raise ValueError(f"block_s must be a positive number of seconds, got {block_s}")
    path = Path(path)
    info = audio_info(path)
    _check_length(path, info.n_frames, info.sample_rate, math.inf)
    import soundfile

    try:
        sound = soundfile.SoundFile(str(path))
    except Exception as err:  # noqa: BLE001
        raise AudioError(f"{path}: not a readable audio file ({_libsndfile_message(err)})") from None
    return _windows(path, sound, window, hop, max(1, math.ceil(block_s * sound.samplerate)))


def _windows(path: Path, sound: Any, window: int, hop: int, block: int) -> Iterator[Window]:
    from scipy.signal import resample_poly

    rate = int(sound.samplerate)
    up, down = _ratio(rate)
    # resample_poly's output m is sum_k x[k] h[half + m * down - k * up] (h has 2 * half + 1 taps, zeros outside
    # the input): it needs the inputs k with |m * down - k * up| <= half, and a segment that starts at an input
    # index s that is a multiple of `down` puts its output i at m = s * up / down + i, in the same filter phase.
    half = 10 * max(up, down)
    frames = np.empty((block, int(sound.channels)))   # one block as read, reused
    x = np.empty(block + half // up + 2 * down + 2)   # mono input still needed: x[:n_x] holds inputs from x0,
    n_x = x0 = 0                                      # a multiple of down (the buffer grows only for tiny blocks)
    y = np.empty(0, np.float32)   # 16 kHz output from index y0 (the next window's start) to y_end
    y0 = y_end = 0
    k = 0                         # the next window
    read = 0                      # frames read so far
    with sound:
        eof = False
        while not eof:
            try:
                chunk = sound.read(dtype="float64", always_2d=True, out=frames)
            except Exception as err:  # noqa: BLE001 -- libsndfile's errors for a damaged stream
                raise AudioError(f"{path}: unreadable audio ({type(err).__name__}: "
                                 f"{_libsndfile_message(err)})") from None
            eof = chunk.shape[0] < block
            if n_x + chunk.shape[0] > len(x):
                x = np.concatenate([x[:n_x], np.empty(block)])
            x[n_x:n_x + chunk.shape[0]] = _mono(path, chunk, read)
            n_x += chunk.shape[0]
            read += chunk.shape[0]
            x_end = x0 + n_x
            if rate == SAMPLE_RATE:
                new, x0, n_x = x[:n_x], x_end, 0
            else:
                # outputs ready: all of them at the end of the file, else those whose inputs are all read
                m_hi = -(-x_end * up // down) if eof else ((x_end - 1) * up - half) // down + 1
                if m_hi <= y_end:
                    continue
                offset = x0 * up // down
                new = resample_poly(x[:n_x], up, down)[y_end - offset:m_hi - offset]
                # keep only the inputs later outputs need, from a multiple of down
                keep = max(0, m_hi * down - half) // up // down * down
                if keep > x0:
                    n_x -= keep - x0
                    x[:n_x] = x[keep - x0:keep - x0 + n_x].copy()
                    x0 = keep
            y = np.concatenate([y, np.asarray(new, dtype=np.float32)])
            y_end += len(new)
            while k * hop + window <= y_end:  # every full window now read
                start = k * hop
                yield Window(k, start / SAMPLE_RATE, (start + window) / SAMPLE_RATE,
                             y[start - y0:start - y0 + window].copy())
                k += 1
            if k * hop > y0:
                y, y0 = y[k * hop - y0:], k * hop
    if read == 0:
        raise AudioError(f"{path}: no audio samples (0 frames)")
    for start in window_starts(y_end, window, hop)[k:]:  # the last, shorter window(s)
        wave = y[start - y0:min(start + window, y_end) - y0].copy()
        yield Window(k, start / SAMPLE_RATE, (start + len(wave)) / SAMPLE_RATE, wave)
        k += 1


def crop_start(length: int, n_samples: int, rng: np.random.Generator | None = None) -> int:
    """Where `crop_or_pad` cuts a clip of `length` samples: a random start when `rng` is given and the clip is
    longer than the window, else 0. Separate so a reader can fetch only the window (`extract.clips`)."""
    return int(rng.integers(0, length - n_samples + 1)) if rng is not None and length >= n_samples else 0


def crop_or_pad(
    wave: np.ndarray, n_samples: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-length window of `wave` and its mask (bool: True = real sample, False = padding; bool rather than
    int64 because it is built for every training crop and crosses from DataLoader workers: 8x fewer bytes).

    Longer clips: a random window when `rng` is given (training), else the first `n_samples` (evaluation and
    dumping, as the reference code does). Shorter clips are zero-padded on the right; the mask is what lets
    pooling ignore that padding, which the reference code did not do.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wave.shape}")
    mask = np.zeros(n_samples, dtype=bool)
    if len(wave) >= n_samples:
        start = crop_start(len(wave), n_samples, rng)
        mask[:] = True
        return wave[start:start + n_samples].copy(), mask
    clip = np.zeros(n_samples, dtype=np.float32)
    clip[:len(wave)] = wave
    mask[:len(wave)] = True
    return clip, mask


def _riff_bytes(tag: int, bits: int, channels: int, rate: int, n_frames: int, data: bytes, extensible: bool) -> bytes:
    block_align = channels * bits // 8
    common = struct.pack("<HIIHH", channels, rate, rate * block_align, block_align, bits)
    if extensible:
        mask = (1 << channels) - 1 if channels <= 18 else 0
        fmt = struct.pack("<H", _EXTENSIBLE) + common + struct.pack("<HHI", 22, bits, mask)
        fmt += struct.pack("<H", tag) + _GUID_TAIL
    elif tag == _PCM:
        fmt = struct.pack("<H", tag) + common
    else:
        fmt = struct.pack("<H", tag) + common + struct.pack("<H", 0)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if tag != _PCM or extensible:  # non-PCM formats carry a fact chunk with the frame count
        chunks += b"fact" + struct.pack("<II", 4, n_frames)
    chunks += b"data" + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _encode(wave: np.ndarray, tag: int, bits: int) -> bytes:
    if tag == _FLOAT:
        return wave.astype("<f4" if bits == 32 else "<f8").tobytes()
    full = 2 ** (bits - 1)
    ints = np.clip(np.round(wave * full), -full, full - 1).astype(np.int64)
    if bits == 8:
        return (ints + 128).astype(np.uint8).tobytes()
    if bits == 24:  # scipy cannot write 24-bit: keep the low three bytes of each little-endian int32
        return ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return ints.astype("<i2" if bits == 16 else "<i4").tobytes()


def write_wav(
    path: str | os.PathLike,
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    subtype: str = "PCM_16",
    *,
    extensible: bool = False,
) -> None:
    """Write `wave` (float in [-1, 1], [n] or [n, channels]) atomically as a WAV file.

    Integer subtypes round to the nearest step and clip to the format's range. `extensible=True` writes a
    WAVE_FORMAT_EXTENSIBLE header, as many recorders do, so readers can be tested against it.
    """
    if subtype not in SUBTYPES:
        raise ValueError(f"unknown WAV subtype {subtype!r}; expected one of {', '.join(SUBTYPES)}")
    tag, bits = SUBTYPES[subtype]
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim == 1:
        wave = wave[:, None]
    if wave.ndim != 2 or wave.shape[1] < 1:
        raise ValueError(f"expected a waveform of shape [n] or [n, channels], got {wave.shape}")
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: refusing to write non-finite samples")
    if sample_rate < 1:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    data = _encode(np.ascontiguousarray(wave).reshape(-1), tag, bits)
    payload = _riff_bytes(tag, bits, wave.shape[1], int(sample_rate), wave.shape[0], data, extensible)
    write_bytes_atomic(path, payload, suffix=".wav")
