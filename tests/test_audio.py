"""Audio decoding: every WAV encoding/rate/layout, and the other formats libsndfile reads, become the same 16 kHz
mono float signal, with clear errors."""
import re
import struct
import wave as wave_module

import numpy as np
import pytest
from scipy.io import wavfile

from extract.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    audio_info,
    crop_or_pad,
    load_audio,
    n_samples_16k,
    samples_at_16k,
    wav_info,
    write_wav,
)

RATES = (8000, 22050, 44100, 48000)
SUBTYPES = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")
FREQ, AMP, SECONDS = 440.0, 0.5, 0.5


def sine(rate: int, seconds: float = SECONDS, freq: float = FREQ, amp: float = AMP) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)


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
    y = load_audio(path)
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
    np.testing.assert_allclose(load_audio(tmp_path / "st.wav"), (left + right) / 2, atol=1e-7)
    # at another rate the downmix equals the load of a mono file holding the mean
    l44, r44 = sine(44100, freq=300, amp=0.6), sine(44100, freq=1000, amp=0.2)
    write_wav(tmp_path / "st44.wav", np.stack([l44, r44], 1), 44100, "DOUBLE")
    write_wav(tmp_path / "mono44.wav", (l44 + r44) / 2, 44100, "DOUBLE")
    np.testing.assert_allclose(load_audio(tmp_path / "st44.wav"), load_audio(tmp_path / "mono44.wav"), atol=1e-6)


def test_six_channels_extensible_header(tmp_path):
    channels = np.stack([sine(48000, amp=0.1 * (k + 1)) for k in range(6)], 1)
    write_wav(tmp_path / "six.wav", channels, 48000, "PCM_24", extensible=True)
    assert wav_info(tmp_path / "six.wav") == (48000, 24000, 6, 0.5)
    y = load_audio(tmp_path / "six.wav")
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
        np.testing.assert_allclose(load_audio(tmp_path / f"{name}.wav"), np.float32(expected), rtol=0, atol=1e-9)


def test_24_bit_is_scaled_by_2_pow_23_not_by_scipys_int32_container(tmp_path):
    # 0, 2**22, -2**22, -2**23, 2**23-1 as 3-byte little-endian frames
    frames = b"\x00\x00\x00" + b"\x00\x00\x40" + b"\x00\x00\xc0" + b"\x00\x00\x80" + b"\xff\xff\x7f"
    (tmp_path / "h24.wav").write_bytes(riff(pcm_fmt(1, SAMPLE_RATE, 24), frames))
    expected = np.float32([0, 0.5, -0.5, -1, 1 - 2**-23])
    np.testing.assert_array_equal(load_audio(tmp_path / "h24.wav"), expected)
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
    np.testing.assert_array_equal(load_audio(tmp_path / "l.wav"), np.float32([0, 0.5]))


def test_crop_or_pad_shapes_masks_and_windows():
    wave = np.arange(10, dtype=np.float32)
    clip, mask = crop_or_pad(wave, 4)
    np.testing.assert_array_equal(clip, [0, 1, 2, 3])
    np.testing.assert_array_equal(mask, [1, 1, 1, 1])
    assert clip.dtype == np.float32 and mask.dtype == np.bool_

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
        load_audio(path, **kwargs)
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

    (tmp_path / "odd.wav").write_bytes(riff(pcm_fmt(1, SAMPLE_RATE, 16), b"\x00" * 5))
    assert _message(tmp_path / "odd.wav") == (
        f"{tmp_path / 'odd.wav'}: malformed data chunk (5 bytes is not a whole number of 2-byte frames)")
    # an encoding libsndfile cannot decode (0x1234 is no registered tag): one line naming the file and the tag
    (tmp_path / "tag.wav").write_bytes(riff(struct.pack("<HHIIHH", 0x1234, 1, 8000, 8000, 1, 8), b"\x00" * 4))
    for reader in (load_audio, wav_info):
        with pytest.raises(AudioError) as err:
            reader(tmp_path / "tag.wav")
        assert str(err.value).startswith(
            f"{tmp_path / 'tag.wav'}: WAV encoding unknown (format tag 0x1234) cannot be decoded (libsndfile: ")
        assert "\n" not in str(err.value)
    (tmp_path / "dir.wav").mkdir()
    assert _message(tmp_path / "dir.wav") == f"{tmp_path / 'dir.wav'}: not a regular file"
    (tmp_path / "b12.wav").write_bytes(riff(struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 12), b"\x00" * 4))
    assert _message(tmp_path / "b12.wav") == (
        f"{tmp_path / 'b12.wav'}: unsupported PCM bit depth 12 (supported: 8, 16, 24, 32)")


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


# ---------------------------------------------------------------------------------------------- libsndfile formats

def burst(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A vocal-burst-like test signal: five harmonics of a 220 Hz fundamental with 3 Hz vibrato, 50 ms fades."""
    t = np.arange(round(rate * seconds)) / rate
    phase = 2 * np.pi * np.cumsum(220 + 30 * np.sin(2 * np.pi * 3 * t)) / rate
    fade = np.minimum(1, t / 0.05) * np.minimum(1, (seconds - t) / 0.05)
    return 0.4 * fade * sum(np.sin(k * phase) / k for k in range(1, 6))


@pytest.mark.parametrize("subtype", ("PCM_16", "PCM_24"))
@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (44100, 2), (48000, 2)])
def test_flac_decodes_exactly_as_the_same_samples_in_a_wav(tmp_path, rate, channels, subtype):
    import soundfile

    x = np.stack([burst(rate) * (1 - 0.3 * c) for c in range(channels)], 1)
    write_wav(tmp_path / "a.wav", x, rate, subtype)
    ints = soundfile.read(tmp_path / "a.wav", dtype="int32")[0]       # the WAV's integer samples (left-aligned)
    soundfile.write(tmp_path / "a.flac", ints, rate, subtype=subtype)  # lossless: the very same samples
    np.testing.assert_array_equal(load_audio(tmp_path / "a.flac"), load_audio(tmp_path / "a.wav"))
    assert audio_info(tmp_path / "a.flac") == wav_info(tmp_path / "a.wav")


@pytest.mark.parametrize("rate", (16000, 48000))
def test_ogg_vorbis_has_the_same_length_and_a_high_snr(tmp_path, rate):
    """Vorbis is a perceptual codec: it keeps what is audible, not the waveform, so sample-wise equality is no
    criterion and a max-abs bound would hinge on the encoder version. The signal-to-noise ratio against the
    PCM_16 original is: libvorbis's default quality gives 30-35 dB on this signal (libsndfile 1.2.2); 20 dB
    (1 % of the energy) leaves room for other libvorbis versions while still catching a misaligned (delayed),
    wrongly scaled or wrongly resampled decode, each of which drops it towards or below 0 dB."""
    import soundfile

    x = burst(rate)
    write_wav(tmp_path / "a.wav", x, rate, "PCM_16")
    soundfile.write(tmp_path / "a.ogg", x, rate)
    reference, decoded = load_audio(tmp_path / "a.wav"), load_audio(tmp_path / "a.ogg")
    assert decoded.dtype == np.float32 and len(decoded) == len(reference) == 16000
    assert n_samples_16k(tmp_path / "a.ogg") == len(decoded)
    snr = 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - decoded) ** 2.0))
    assert snr > 20, snr


def test_alaw_and_mulaw_wavs_decode_to_the_g711_table_values(tmp_path):
    """Hand values from the G.711 expansion (Sun's g711.c, which libsndfile's tables follow), in 16-bit units:
    A-law 0xD5 -> +8, 0x55 -> -8, 0x00 -> -5504, 0xAA -> +32256, 0x2A -> -32256;
    mu-law 0xFF -> 0, 0xFE -> +8, 0x7E -> -8, 0x80 -> +32124, 0x00 -> -32124."""
    def g711(tag: int, codes: bytes) -> bytes:
        return riff(struct.pack("<HHIIHHH", tag, 1, SAMPLE_RATE, SAMPLE_RATE, 1, 8, 0), codes)

    (tmp_path / "a.wav").write_bytes(g711(6, bytes([0xD5, 0x55, 0x00, 0xAA, 0x2A])))
    (tmp_path / "u.wav").write_bytes(g711(7, bytes([0xFF, 0xFE, 0x7E, 0x80, 0x00])))
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), np.float32([8, -8, -5504, 32256, -32256]) / 32768)
    np.testing.assert_array_equal(load_audio(tmp_path / "u.wav"), np.float32([0, 8, -8, 32124, -32124]) / 32768)
    assert wav_info(tmp_path / "a.wav") == (SAMPLE_RATE, 5, 1, 5 / SAMPLE_RATE)   # length via libsndfile


@pytest.mark.parametrize("subtype", ("ULAW", "ALAW"))
def test_alaw_and_mulaw_stay_within_one_quantisation_step_of_the_pcm16_source(tmp_path, subtype):
    """G.711 has 8 segments of 16 steps; in segment s (16-bit units) a step is 2**(s+3) and every value in it has
    magnitude >= 16.5 steps (mu-law: 132 * 2**s - 132; A-law from s = 2: 264 * 2**(s-1)), the smallest step
    being 8 (mu-law) or 16 (A-law). So one step, the most any encoder (rounding or truncating) can be off, is at
    most |x| / 16.5 + 16 units; one more unit covers the PCM_16 rounding of the reference."""
    import soundfile

    x = np.concatenate([burst(SAMPLE_RATE), np.linspace(-1, 1, 4001),
                        0.9 * np.random.default_rng(1).uniform(-1, 1, 8000)])
    soundfile.write(tmp_path / "p.wav", x, SAMPLE_RATE, subtype="PCM_16")
    soundfile.write(tmp_path / "g.wav", x, SAMPLE_RATE, subtype=subtype)
    reference, decoded = load_audio(tmp_path / "p.wav"), load_audio(tmp_path / "g.wav")
    assert len(decoded) == len(reference) == len(x)
    bound = np.abs(reference.astype(np.float64)) / 16.5 + 17 / 32768
    assert np.all(np.abs(decoded - reference) <= bound)
    assert np.abs(decoded - reference).max() > 2 / 32768       # and it is lossy: not the PCM_16 samples


@pytest.mark.parametrize("subtype", ("IMA_ADPCM", "MS_ADPCM", "GSM610"))
def test_adpcm_and_gsm_wavs_are_accepted(tmp_path, subtype):
    """Encodings the header check cannot size itself: libsndfile gives the length (whole codec blocks, so it
    may exceed the source's) and decodes them; a cut data chunk is still refused by the header check."""
    import soundfile

    x = burst(8000, 2.0)
    soundfile.write(tmp_path / "c.wav", x, 8000, subtype=subtype)
    info = wav_info(tmp_path / "c.wav")
    assert info.sample_rate == 8000 and info.n_channels == 1
    assert info.n_frames == soundfile.info(tmp_path / "c.wav").frames >= len(x)
    y = load_audio(tmp_path / "c.wav")
    assert len(y) == n_samples_16k(tmp_path / "c.wav") == samples_at_16k(info.n_frames, 8000)
    core = slice(1600, 2 * 16000 - 1600)           # after ADPCM's adaptation, before the fade
    upsampled = np.interp(np.arange(len(y)) / 2, np.arange(len(x)), x)
    assert np.corrcoef(y[core], upsampled[core])[0, 1] > 0.95
    raw = (tmp_path / "c.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[:len(raw) - 100])
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'cut.wav'}: truncated audio data (header "
                                                   f"declares ")):
        load_audio(tmp_path / "cut.wav")


def test_rf64_wav_is_read_through_its_ds64_sizes(tmp_path):
    import soundfile

    x = burst(48000, 0.5)
    soundfile.write(tmp_path / "r.wav", x, 48000, format="RF64", subtype="PCM_16")
    assert (tmp_path / "r.wav").read_bytes()[:4] == b"RF64"
    soundfile.write(tmp_path / "p.wav", x, 48000, subtype="PCM_16")
    assert wav_info(tmp_path / "r.wav") == wav_info(tmp_path / "p.wav") == (48000, 24000, 1, 0.5)
    np.testing.assert_array_equal(load_audio(tmp_path / "r.wav"), load_audio(tmp_path / "p.wav"))
    raw = (tmp_path / "r.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[:-1000])   # libsndfile alone would read the shorter clip
    assert _message(tmp_path / "cut.wav") == (
        f"{tmp_path / 'cut.wav'}: truncated audio data (header declares 48000 bytes, file holds 47000)")


# format and subtype soundfile writes for each extension of AUDIO_EXTENSIONS; None = lossy (decodes, same length)
EXTENSION_FORMATS = {
    ".wav": ("WAV", "PCM_16"), ".wave": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"),
    ".aiff": ("AIFF", "PCM_16"), ".aif": ("AIFF", "PCM_16"), ".aifc": ("AIFF", "PCM_16"),
    ".au": ("AU", "PCM_16"), ".snd": ("AU", "PCM_16"), ".caf": ("CAF", "PCM_16"), ".w64": ("W64", "PCM_16"),
    ".rf64": ("RF64", "PCM_16"), ".ogg": ("OGG", None), ".oga": ("OGG", None), ".opus": ("OGG", None),
    ".mp3": ("MP3", None),
}


def test_every_audio_extension_is_a_format_libsndfile_reads(tmp_path):
    import soundfile

    assert set(EXTENSION_FORMATS) == AUDIO_EXTENSIONS
    assert {fmt for fmt, _ in EXTENSION_FORMATS.values()} <= set(soundfile.available_formats())
    x = np.round(burst(48000, 0.5) * 32767).astype(np.int16)  # int16 samples: every lossless format stores these
    write_wav(tmp_path / "ref.wav", x / 32768, 48000, "PCM_16")
    reference = load_audio(tmp_path / "ref.wav")
    for ext, (fmt, subtype) in EXTENSION_FORMATS.items():
        path = tmp_path / f"a{ext.upper() if ext == '.flac' else ext}"   # the extension's case does not matter
        opus = ext == ".opus"
        soundfile.write(path, x, 48000, format=fmt, subtype="OPUS" if opus else subtype)
        y = load_audio(path)
        assert len(y) == len(reference) == n_samples_16k(path), ext
        if subtype is not None:
            np.testing.assert_array_equal(y, reference, err_msg=ext)
        else:
            assert np.corrcoef(y[800:-800], reference[800:-800])[0, 1] > 0.9, ext


def test_length_at_16k_is_the_resamplers_ceiling():
    # ceil(n * up / down) with 44.1 kHz -> 16 kHz = up 160 / down 441, 48 kHz = 1 / 3, 8 kHz = 2 / 1
    assert samples_at_16k(1, 44100) == 1                 # 160 / 441 -> 1
    assert samples_at_16k(44101, 44100) == 16001         # 16000.36 -> 16001
    assert samples_at_16k(44100 * 600, 44100) == 16000 * 600
    assert samples_at_16k(4, 48000) == 2                 # 1.33 -> 2
    assert samples_at_16k(7, 8000) == 14
    assert samples_at_16k(5, 16000) == 5
