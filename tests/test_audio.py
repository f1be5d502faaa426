"""Audio decoding: every WAV encoding/rate/layout becomes the same 16 kHz mono float signal, with clear errors."""
import re
import struct
import wave as wave_module

import numpy as np
import pytest
from scipy.io import wavfile

from extract.audio import (
    SAMPLE_RATE,
    AudioError,
    crop_or_pad,
    load_wav,
    wav_info,
    write_wav,
)

RATES = (8000, 22050, 44100, 48000)
SUBTYPES = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")
FREQ, AMP, SECONDS = 440.0, 0.5, 0.5


def sine(rate: int, seconds: float = SECONDS, freq: float = FREQ, amp: float = AMP) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * rate))) / rate)


def riff(fmt_body: bytes, data: bytes, extra_chunks: bytes = b"") -> bytes:
    """A WAV file assembled by hand, independent of write_wav."""
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body + extra_chunks
    body += b"data" + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) % 2)  # pad byte not counted
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pcm_fmt(channels: int, rate: int, bits: int) -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, bits)


@pytest.mark.parametrize("channels", (1, 2))
@pytest.mark.parametrize("subtype", SUBTYPES)
@pytest.mark.parametrize("rate", RATES)
def test_sine_survives_every_encoding_rate_and_layout(tmp_path, rate, subtype, channels):
    x = sine(rate)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    path = tmp_path / "s.wav"
    write_wav(path, data, rate, subtype)
    y = load_wav(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - round(SECONDS * SAMPLE_RATE)) <= 1
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(y)
    assert abs(peak_hz - FREQ) <= SAMPLE_RATE / len(y)
    core = y[800:-800]  # away from the resampler's edge transients
    rms_tol = 0.02 if subtype == "PCM_U8" else 0.005
    assert np.sqrt(np.mean(core ** 2)) == pytest.approx(AMP / np.sqrt(2), rel=rms_tol)
    assert np.max(np.abs(core)) == pytest.approx(AMP, rel=0.02)


def test_stereo_is_downmixed_by_mean(tmp_path):
    left, right = sine(SAMPLE_RATE, freq=300, amp=0.6), sine(SAMPLE_RATE, freq=1000, amp=0.2)
    wavfile.write(tmp_path / "st.wav", SAMPLE_RATE, np.stack([left, right], 1).astype(np.float32))
    np.testing.assert_allclose(load_wav(tmp_path / "st.wav"), (left + right) / 2, atol=1e-7)
    # at another rate the downmix equals the load of a mono file holding the mean
    l44, r44 = sine(44100, freq=300, amp=0.6), sine(44100, freq=1000, amp=0.2)
    write_wav(tmp_path / "st44.wav", np.stack([l44, r44], 1), 44100, "DOUBLE")
    write_wav(tmp_path / "mono44.wav", (l44 + r44) / 2, 44100, "DOUBLE")
    np.testing.assert_allclose(load_wav(tmp_path / "st44.wav"), load_wav(tmp_path / "mono44.wav"), atol=1e-6)


def test_six_channels_extensible_header(tmp_path):
    channels = np.stack([sine(48000, amp=0.1 * (k + 1)) for k in range(6)], 1)
    write_wav(tmp_path / "six.wav", channels, 48000, "PCM_24", extensible=True)
    assert wav_info(tmp_path / "six.wav") == (48000, 24000, 6, 0.5)
    y = load_wav(tmp_path / "six.wav")
    mean_amp = np.mean([0.1 * (k + 1) for k in range(6)])
    assert np.max(np.abs(y[800:-800])) == pytest.approx(mean_amp, rel=0.01)


def test_integer_scaling_against_hand_values(tmp_path):
    cases = {
        "u8": (np.array([128, 192, 64, 0, 255], np.uint8), [0, 0.5, -0.5, -1, 127 / 128]),
        "i16": (np.array([0, 16384, -16384, -32768, 32767], np.int16), [0, 0.5, -0.5, -1, 32767 / 32768]),
        "i32": (np.array([0, 2**30, -2**30, -2**31, 2**31 - 1], np.int32), [0, 0.5, -0.5, -1, 1 - 2**-31]),
    }
    for name, (ints, expected) in cases.items():
        wavfile.write(tmp_path / f"{name}.wav", SAMPLE_RATE, ints)
        np.testing.assert_allclose(load_wav(tmp_path / f"{name}.wav"), np.float32(expected), rtol=0, atol=1e-9)


def test_24_bit_is_scaled_by_2_pow_23_not_by_scipys_int32_container(tmp_path):
    # 0, 2**22, -2**22, -2**23, 2**23-1 as 3-byte little-endian frames
    frames = b"\x00\x00\x00" + b"\x00\x00\x40" + b"\x00\x00\xc0" + b"\x00\x00\x80" + b"\xff\xff\x7f"
    (tmp_path / "h24.wav").write_bytes(riff(pcm_fmt(1, SAMPLE_RATE, 24), frames))
    expected = np.float32([0, 0.5, -0.5, -1, 1 - 2**-23])
    np.testing.assert_array_equal(load_wav(tmp_path / "h24.wav"), expected)
    # and write_wav produces exactly those bytes (1.5 clips to the largest code)
    write_wav(tmp_path / "w24.wav", np.array([0, 0.5, -0.5, -1, 1.5]), SAMPLE_RATE, "PCM_24")
    assert (tmp_path / "w24.wav").read_bytes().endswith(b"data" + struct.pack("<I", 15) + frames + b"\x00")


def test_wav_info_matches_the_wave_module_and_reads_float_and_extensible(tmp_path):
    write_wav(tmp_path / "p.wav", np.zeros((22050 * 3 // 2, 2)), 22050, "PCM_16")
    with wave_module.open(str(tmp_path / "p.wav")) as w:
        reference = (w.getframerate(), w.getnframes(), w.getnchannels())
    info = wav_info(tmp_path / "p.wav")
    assert info[:3] == reference == (22050, 33075, 2)
    assert info.duration_s == pytest.approx(1.5)
    write_wav(tmp_path / "f.wav", np.zeros(8000), 8000, "FLOAT")
    assert wav_info(tmp_path / "f.wav") == (8000, 8000, 1, 1.0)
    write_wav(tmp_path / "e.wav", np.zeros((4410, 3)), 44100, "DOUBLE", extensible=True)
    assert wav_info(tmp_path / "e.wav") == (44100, 4410, 3, 0.1)


def test_unknown_chunks_before_data_are_skipped(tmp_path):
    list_chunk = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\x00"  # odd size + pad byte
    data = np.array([0, 16384], "<i2").tobytes()
    (tmp_path / "l.wav").write_bytes(riff(pcm_fmt(1, SAMPLE_RATE, 16), data, list_chunk))
    assert wav_info(tmp_path / "l.wav") == (SAMPLE_RATE, 2, 1, 2 / SAMPLE_RATE)
    np.testing.assert_array_equal(load_wav(tmp_path / "l.wav"), np.float32([0, 0.5]))


def test_crop_or_pad_shapes_masks_and_windows():
    wave = np.arange(10, dtype=np.float32)
    clip, mask = crop_or_pad(wave, 4)
    np.testing.assert_array_equal(clip, [0, 1, 2, 3])
    np.testing.assert_array_equal(mask, [1, 1, 1, 1])
    assert clip.dtype == np.float32 and mask.dtype == np.int64

    start = int(np.random.default_rng(3).integers(0, 10 - 4 + 1))
    clip, mask = crop_or_pad(wave, 4, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(clip, wave[start:start + 4])
    starts = {int(crop_or_pad(wave, 4, rng=np.random.default_rng(s))[0][0]) for s in range(60)}
    assert starts == set(range(7))  # every valid window, and none beyond the end

    clip, mask = crop_or_pad(wave[:3], 5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(clip, [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0])
    clip, mask = crop_or_pad(wave, 10)
    np.testing.assert_array_equal(clip, wave)
    assert mask.sum() == 10
    clip[0] = 99  # a copy, never a view of the caller's array
    assert wave[0] == 0


def _message(path, **kwargs) -> str:
    with pytest.raises(AudioError) as err:
        load_wav(path, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    good = tmp_path / "good.wav"
    write_wav(good, sine(SAMPLE_RATE), SAMPLE_RATE, "PCM_16")
    raw = good.read_bytes()

    assert _message(tmp_path / "nope.wav") == f"{tmp_path / 'nope.wav'}: no such file"

    (tmp_path / "text.wav").write_bytes(b"this is not audio at all")
    assert _message(tmp_path / "text.wav") == (
        f"{tmp_path / 'text.wav'}: not a WAV file (starts with b'this', expected b'RIFF'...b'WAVE')")

    (tmp_path / "short.wav").write_bytes(raw[:30])
    assert _message(tmp_path / "short.wav") == f"{tmp_path / 'short.wav'}: truncated header (fmt chunk of 10 bytes)"
    (tmp_path / "tiny.wav").write_bytes(raw[:8])
    assert _message(tmp_path / "tiny.wav") == f"{tmp_path / 'tiny.wav'}: truncated header (8 bytes)"

    (tmp_path / "cut.wav").write_bytes(raw[:144])
    assert _message(tmp_path / "cut.wav") == (
        f"{tmp_path / 'cut.wav'}: truncated audio data (header declares 16000 bytes, file holds 100)")

    (tmp_path / "empty.wav").write_bytes(b"")
    assert _message(tmp_path / "empty.wav") == f"{tmp_path / 'empty.wav'}: empty file (0 bytes)"

    write_wav(tmp_path / "zero.wav", np.zeros(0), SAMPLE_RATE, "PCM_16")
    assert _message(tmp_path / "zero.wav") == f"{tmp_path / 'zero.wav'}: no audio samples (0 frames)"

    for bad in (np.nan, np.inf):
        samples = np.zeros(100, np.float32)
        samples[42] = bad
        wavfile.write(tmp_path / "bad.wav", SAMPLE_RATE, samples)
        assert _message(tmp_path / "bad.wav") == (
            f"{tmp_path / 'bad.wav'}: non-finite sample (NaN or inf) at frame 42")

    assert _message(good, max_seconds=0.25) == f"{good}: clip is 0.50 s long, more than the 0.25 s maximum"
    write_wav(tmp_path / "long.wav", np.zeros(61 * 8000), 8000, "PCM_U8")
    assert _message(tmp_path / "long.wav") == (
        f"{tmp_path / 'long.wav'}: clip is 61.00 s long, more than the 60 s maximum")

    (tmp_path / "alaw.wav").write_bytes(riff(struct.pack("<HHIIHH", 6, 1, 8000, 8000, 1, 8), b"\x00" * 4))
    (tmp_path / "odd.wav").write_bytes(riff(pcm_fmt(1, SAMPLE_RATE, 16), b"\x00" * 5))
    assert _message(tmp_path / "odd.wav") == (
        f"{tmp_path / 'odd.wav'}: malformed data chunk (5 bytes is not a whole number of 2-byte frames)")
    assert _message(tmp_path / "alaw.wav") == (
        f"{tmp_path / 'alaw.wav'}: unsupported WAV format tag 0x0006 (supported: PCM and IEEE float)")


def test_wav_info_errors_match_load_errors(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'x.wav'}: truncated header (no fmt chunk)")):
        wav_info(tmp_path / "x.wav")
    with pytest.raises(AudioError, match="no such file"):
        wav_info(tmp_path / "missing.wav")


def test_write_wav_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown WAV subtype 'PCM_12'; expected one of PCM_U8, PCM_16"):
        write_wav(tmp_path / "a.wav", np.zeros(4), subtype="PCM_12")
    with pytest.raises(AudioError, match="refusing to write non-finite samples"):
        write_wav(tmp_path / "a.wav", np.array([0.0, np.nan]))
    assert not (tmp_path / "a.wav").exists()
    assert not list(tmp_path.iterdir())  # no temp file left behind
