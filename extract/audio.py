"""Audio in and out: any common WAV becomes 16 kHz mono float32, and clips become fixed-length windows.

wav2vec2 checkpoints are trained on 16 kHz mono float audio in [-1, 1]; the A-VB files are 16 kHz mono in
practice, but users bring their own recordings to `avb predict`, so every PCM depth, float WAVs, any sample
rate and any channel count are accepted here and nowhere else.

The header is parsed by hand (`wav_info`) rather than through the `wave` module because `wave` rejects float
WAVs, and `corpus check` must size tens of thousands of files without decoding them. `load_wav` runs the same
header check first, so a truncated or malformed file gets the same one-line error from both, before
`scipy.io.wavfile` decodes the samples (scipy only warns on a truncated data chunk and returns a partial clip).
Other formats (FLAC, OGG, AIFF, ... -- whatever libsndfile reads) go through `soundfile`, imported only when
such a file is met: `load_audio` / `audio_info` pick the reader by extension and give the same one-line errors,
the same down-mix and the same resampling as `load_wav` / `wav_info`.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cache.command_kit.atomic import write_bytes_atomic
from cache.command_kit.errors import AvbError

SAMPLE_RATE = 16000
MAX_SECONDS = 60.0  # far beyond any vocal burst (A-VB max 9.96 s); guards against decoding a wrong file

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_PCM_BITS = (8, 16, 24, 32)
_FLOAT_BITS = (32, 64)

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


class AudioError(AvbError):
    """A WAV file that cannot be used; the message is one line naming the file."""


class WavInfo(NamedTuple):
    sample_rate: int
    n_frames: int
    n_channels: int
    duration_s: float


class _Header(NamedTuple):
    info: WavInfo
    format_tag: int       # 1 = PCM, 3 = IEEE float (WAVE_FORMAT_EXTENSIBLE resolved to its sub-format)
    bits: int


def _read_header(path: Path) -> _Header:
    """Parse the RIFF chunks up to the start of `data`; never reads the samples."""
    try:
        size = path.stat().st_size
        handle = open(path, "rb")
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except OSError as err:
        raise AudioError(f"{path}: cannot open ({err.strerror or err})") from None
    if not path.is_file():
        handle.close()
        raise AudioError(f"{path}: not a regular file")
    with handle:
        if size == 0:
            raise AudioError(f"{path}: empty file (0 bytes)")
        head = handle.read(12)
        magic_ok = any(m.startswith(head[:4]) for m in (b"RIFF", b"RIFX")) and b"WAVE".startswith(head[8:12])
        if magic_ok and len(head) < 12:
            raise AudioError(f"{path}: truncated header ({size} bytes)")
        if not magic_ok:
            raise AudioError(f"{path}: not a WAV file (starts with {head[:4]!r}, expected b'RIFF'...b'WAVE')")
        endian = "<" if head[:4] == b"RIFF" else ">"
        fmt: tuple[int, int, int, int, int] | None = None
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                what = "fmt" if fmt is None else "data"
                raise AudioError(f"{path}: truncated header (no {what} chunk)")
            chunk_id, chunk_size = chunk[:4], struct.unpack(endian + "I", chunk[4:])[0]
            if chunk_id == b"fmt ":
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
                data_start = handle.tell()
                break
            else:
                handle.seek(chunk_size + chunk_size % 2, os.SEEK_CUR)
    tag, channels, rate, block_align, bits = fmt
    if tag == _PCM and bits not in _PCM_BITS:
        raise AudioError(f"{path}: unsupported PCM bit depth {bits} (supported: 8, 16, 24, 32)")
    if tag == _FLOAT and bits not in _FLOAT_BITS:
        raise AudioError(f"{path}: unsupported float bit depth {bits} (supported: 32, 64)")
    if tag not in (_PCM, _FLOAT):
        raise AudioError(f"{path}: unsupported WAV format tag {tag:#06x} (supported: PCM and IEEE float)")
    if channels < 1 or rate < 1 or block_align != channels * bits // 8:
        raise AudioError(f"{path}: malformed fmt chunk ({channels} channels, {rate} Hz, block align {block_align})")
    available = size - data_start
    if chunk_size > available:
        raise AudioError(f"{path}: truncated audio data (header declares {chunk_size} bytes, "
                         f"file holds {available})")
    if chunk_size % block_align:  # scipy cannot decode a partial frame either
        raise AudioError(f"{path}: malformed data chunk ({chunk_size} bytes is not a whole number of "
                         f"{block_align}-byte frames)")
    n_frames = chunk_size // block_align
    return _Header(WavInfo(rate, n_frames, channels, n_frames / rate), tag, bits)


def wav_info(path: str | os.PathLike) -> WavInfo:
    """(sample_rate, n_frames, n_channels, duration_s) from the header alone -- cheap enough for a corpus."""
    return _read_header(Path(path)).info


def _to_float(samples: np.ndarray, bits: int) -> np.ndarray:
    """Integer PCM -> float64 in [-1, 1); float samples unchanged."""
    if samples.dtype == np.uint8:  # 8-bit WAV is unsigned with 128 as silence
        return (samples.astype(np.float64) - 128.0) / 128.0
    if samples.dtype == np.int16:
        return samples.astype(np.float64) / 32768.0
    if samples.dtype == np.int32:
        # scipy returns 24-bit PCM left-aligned in int32 (the low byte is zero), so 24- and 32-bit files
        # share the 2**31 scale; dividing 24-bit by 2**23 would be 256 times too loud.
        return samples.astype(np.float64) / 2147483648.0
    if samples.dtype.kind == "f":
        return samples.astype(np.float64)
    raise AudioError(f"unsupported sample type {samples.dtype} ({bits} bits)")


def load_wav(path: str | os.PathLike, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Decode a WAV file to float32 mono at 16 kHz (channels averaged, polyphase resampling)."""
    from scipy.io import wavfile

    path = Path(path)
    header = _read_header(path)
    info = header.info
    if info.n_frames == 0:
        raise AudioError(f"{path}: no audio samples (0 frames)")
    if info.duration_s > max_seconds:
        raise AudioError(f"{path}: clip is {info.duration_s:.2f} s long, more than the {max_seconds:g} s maximum")
    try:
        with warnings.catch_warnings():  # e.g. "chunk not understood" for LIST chunks: harmless
            warnings.simplefilter("ignore")
            rate, samples = wavfile.read(path, mmap=False)
    except Exception as err:  # scipy raises ValueError, struct.error, EOFError... for bad files
        raise AudioError(f"{path}: unreadable WAV ({type(err).__name__}: {err})".replace("\n", " ")) from None
    try:
        wave = _to_float(samples, header.bits)
    except AudioError as err:
        raise AudioError(f"{path}: {err}") from None
    return _mono_16k(path, wave, int(rate))


def _mono_16k(path: Path, wave: np.ndarray, rate: int) -> np.ndarray:
    """Float samples ([n] or [n, channels]) -> float32 mono at 16 kHz: channels averaged, polyphase resampling."""
    from scipy.signal import resample_poly

    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if wave.size == 0:
        raise AudioError(f"{path}: no audio samples (0 frames)")
    if not np.isfinite(wave).all():
        bad = int(np.flatnonzero(~np.isfinite(wave))[0])
        raise AudioError(f"{path}: non-finite sample (NaN or inf) at frame {bad}")
    if rate != SAMPLE_RATE:
        g = math.gcd(int(rate), SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // g, int(rate) // g)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _is_wav(path: Path) -> bool:
    return path.suffix.lower() in (".wav", ".wave")


def _soundfile_info(path: Path) -> Any:
    """soundfile's header for a non-WAV file, with the same one-line errors as the WAV reader."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except OSError as err:
        raise AudioError(f"{path}: cannot open ({err.strerror or err})") from None
    if not path.is_file():
        raise AudioError(f"{path}: not a regular file")
    if size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as err:  # noqa: BLE001 -- soundfile.LibsndfileError (a RuntimeError), TypeError, ...
        raise AudioError(f"{path}: not a readable audio file ({_one_line(err)})") from None
    if info.samplerate < 1 or info.channels < 1:
        raise AudioError(f"{path}: malformed header ({info.channels} channels, {info.samplerate} Hz)")
    return info


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def audio_info(path: str | os.PathLike) -> WavInfo:
    """(sample_rate, n_frames, n_channels, duration_s) of any audio file from its header: `wav_info` for a
    .wav file, soundfile (libsndfile: FLAC, OGG, AIFF, ...) for the others."""
    path = Path(path)
    if _is_wav(path):
        return wav_info(path)
    info = _soundfile_info(path)
    frames = max(int(info.frames), 0)
    return WavInfo(int(info.samplerate), frames, int(info.channels), frames / info.samplerate)


def load_audio(path: str | os.PathLike, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Decode any audio file to float32 mono at 16 kHz: `load_wav` for a .wav file, soundfile for FLAC, OGG and
    the other formats libsndfile reads; the same checks, errors, down-mix and resampling either way."""
    path = Path(path)
    if _is_wav(path):
        return load_wav(path, max_seconds)
    info = _soundfile_info(path)
    if info.frames == 0:
        raise AudioError(f"{path}: no audio samples (0 frames)")
    duration = info.frames / info.samplerate
    if info.frames > 0 and duration > max_seconds:
        raise AudioError(f"{path}: clip is {duration:.2f} s long, more than the {max_seconds:g} s maximum")
    import soundfile

    try:
        # float64 keeps integer sources exact: 16-bit FLAC reads as int16 / 32768, as load_wav scales PCM_16
        wave, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except Exception as err:  # noqa: BLE001 -- libsndfile's errors for a damaged stream
        raise AudioError(f"{path}: unreadable audio ({type(err).__name__}: {_one_line(err)})") from None
    if wave.shape[0] / rate > max_seconds:  # formats whose header does not give the length
        raise AudioError(f"{path}: clip is {wave.shape[0] / rate:.2f} s long, more than the {max_seconds:g} s "
                         f"maximum")
    return _mono_16k(path, wave, int(rate))


def crop_or_pad(
    wave: np.ndarray, n_samples: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-length window of `wave` and its attention mask (1 = real sample, 0 = padding).

    Longer clips: a random window when `rng` is given (training), else the first `n_samples` (evaluation and
    dumping, as the reference code does). Shorter clips are zero-padded on the right; the mask is what lets
    pooling ignore that padding, which the reference code did not do.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wave.shape}")
    mask = np.zeros(n_samples, dtype=np.int64)
    if len(wave) >= n_samples:
        start = int(rng.integers(0, len(wave) - n_samples + 1)) if rng is not None else 0
        mask[:] = 1
        return wave[start:start + n_samples].copy(), mask
    clip = np.zeros(n_samples, dtype=np.float32)
    clip[:len(wave)] = wave
    mask[:len(wave)] = 1
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
