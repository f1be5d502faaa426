"""The bounded-memory window reader for long recordings (`audio_windows`): every window equals the same samples
sliced out of the whole-file decode (`load_audio`), the window grid is the hand-worked one, memory does not grow
with the file, and bad --window / --hop values are refused in one line."""
from __future__ import annotations

import math
import re
import tracemalloc

import numpy as np
import pytest

from extract.audio import (
    SAMPLE_RATE,
    AudioError,
    Window,
    WindowError,
    audio_windows,
    load_audio,
    n_samples_16k,
    to_mono_16k,
    window_starts,
    write_wav,
)


def recording(rate: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    """Noise (every frequency, so a misaligned or wrongly filtered block shows) under a gliding tone."""
    n = round(rate * seconds)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    tone = 0.4 * np.sin(2 * np.pi * (200 + 300 * t / seconds) * t)
    return np.stack([tone * (1 - 0.4 * c) + 0.1 * rng.standard_normal(n) for c in range(channels)], 1)


def write(path, wave: np.ndarray, rate: int) -> None:
    import soundfile

    soundfile.write(path, wave, rate, subtype="PCM_16")


def assert_windows_slice_the_whole_decode(path, window_s: float, hop_s: float, block_s: float) -> list[Window]:
    whole = load_audio(path, max_seconds=math.inf)
    assert n_samples_16k(path) == len(whole)
    window, hop = round(window_s * SAMPLE_RATE), round(hop_s * SAMPLE_RATE)
    windows = list(audio_windows(path, window_s, hop_s, block_s=block_s))
    starts = window_starts(len(whole), window, hop)
    assert [w.index for w in windows] == list(range(len(starts)))
    assert [round(w.start_s * SAMPLE_RATE) for w in windows] == starts
    for w, start in zip(windows, starts):
        expected = whole[start:start + window]
        assert w.wave.dtype == np.float32 and w.wave.shape == expected.shape
        assert w.start_s == start / SAMPLE_RATE and w.end_s == (start + len(expected)) / SAMPLE_RATE
        np.testing.assert_allclose(w.wave, expected, rtol=0, atol=1e-6)
    assert windows[-1].end_s == len(whole) / SAMPLE_RATE        # the last window reaches the end
    return windows


# 4.37 s: neither 2.5 / 1.25 nor 1.0 / 0.3 divides it; 3.0 / 3.0 gives non-overlapping windows, the last short;
# blocks of 0.7 s and 0.05 s put many block edges inside each window (0.05 s is less than some windows' hop).
@pytest.mark.parametrize("ext", ("wav", "flac"))
@pytest.mark.parametrize("channels", (1, 2))
@pytest.mark.parametrize("rate", (16000, 44100, 48000, 8000))
def test_windows_equal_slices_of_the_whole_file_decode(tmp_path, rate, channels, ext):
    path = tmp_path / f"r.{ext}"
    write(path, recording(rate, 4.37, channels), rate)
    for window_s, hop_s, block_s in ((2.5, 1.25, 0.7), (1.0, 0.3, 0.05), (3.0, 3.0, 0.7)):
        assert_windows_slice_the_whole_decode(path, window_s, hop_s, block_s)


@pytest.mark.parametrize("rate", (16000, 44100, 8000))
def test_a_recording_shorter_than_one_window_gives_one_short_window(tmp_path, rate):
    write(tmp_path / "s.wav", recording(rate, 1.1, 2), rate)
    (only,) = assert_windows_slice_the_whole_decode(tmp_path / "s.wav", 2.5, 1.25, 0.3)
    assert only.start_s == 0 and only.end_s == 1.1 and len(only.wave) == 17600


def test_blocks_smaller_than_the_filter_context_and_other_codecs(tmp_path):
    import soundfile

    # 1 ms blocks at 44.1 kHz are 45 frames, about the resampler's one-sided context (28 frames) plus one
    # polyphase period (441): outputs wait for enough blocks
    write(tmp_path / "r.wav", recording(44100, 1.3, 1), 44100)
    assert_windows_slice_the_whole_decode(tmp_path / "r.wav", 0.5, 0.2, 0.001)
    # lossy and compressed streams too: the reader sees what libsndfile decodes, block by block
    soundfile.write(tmp_path / "v.ogg", recording(48000, 2.2, 2), 48000)
    assert_windows_slice_the_whole_decode(tmp_path / "v.ogg", 1.0, 0.5, 0.4)
    soundfile.write(tmp_path / "u.wav", recording(8000, 2.2, 1), 8000, subtype="ULAW")
    assert_windows_slice_the_whole_decode(tmp_path / "u.wav", 1.0, 0.5, 0.4)


def test_window_starts_by_hand():
    w, h = 40000, 20000                                                    # 2.5 s every 1.25 s
    # 10 s: 1 + ceil((160000 - 40000) / 20000) = 7 windows, starts 0, 1.25, ..., 7.5 s; the last ends at 10 s
    assert [s / 16000 for s in window_starts(160000, w, h)] == [0, 1.25, 2.5, 3.75, 5.0, 6.25, 7.5]
    # 600 s: 1 + (9600000 - 40000) / 20000 = 479 windows, the last from 597.5 s to 600 s
    starts = window_starts(600 * 16000, w, h)
    assert len(starts) == 479 and starts[-1] == 597.5 * 16000
    # 10.1 s: 1 + ceil(6.08) = 8 windows, the last from 8.75 s, 1.35 s long
    assert window_starts(161600, w, h)[-2:] == [120000, 140000]
    assert window_starts(40000, w, h) == [0]                                # exactly one window
    assert window_starts(40001, w, h) == [0, 20000]                         # one sample more: a second
    assert window_starts(17600, w, h) == [0]                                # shorter than one window
    assert window_starts(10, 3, 3) == [0, 3, 6, 9]                          # no overlap, the last 1 long
    # in samples, but worded in seconds for the command line, as audio_windows' own check
    with pytest.raises(WindowError, match=re.escape("--hop must be > 0 and at most --window (2.5 s), got 3.75")):
        window_starts(10, 40000, 60000)
    with pytest.raises(WindowError, match=re.escape("--hop must be > 0 and at most --window (2.5 s), got 0")):
        window_starts(10, 40000, 0)
    with pytest.raises(WindowError, match=re.escape("--window must be a positive number of seconds, got 0")):
        window_starts(10, 0, 0)


def test_window_grid_of_a_10_s_recording(tmp_path):
    write_wav(tmp_path / "ten.wav", recording(16000, 10.0, 1)[:, 0], 16000)
    windows = list(audio_windows(tmp_path / "ten.wav", 2.5, 1.25, block_s=3.0))
    assert [(w.start_s, w.end_s) for w in windows] == [(1.25 * k, 1.25 * k + 2.5) for k in range(7)]


@pytest.mark.parametrize(("window_s", "hop_s", "message"), [
    (2.5, 0, "--hop must be > 0 and at most --window (2.5 s), got 0"),
    (2.5, -1, "--hop must be > 0 and at most --window (2.5 s), got -1"),
    (2.5, 3, "--hop must be > 0 and at most --window (2.5 s), got 3"),
    (2.5, math.nan, "--hop must be > 0 and at most --window (2.5 s), got nan"),
    (0, 0, "--window must be a positive number of seconds, got 0"),
    (math.inf, 1, "--window must be a positive number of seconds, got inf"),
    (2.5, 1e-5, "--hop must be at least one 16 kHz sample (1/16000 s), got 1e-05"),
])
def test_bad_window_or_hop_is_refused_in_one_line_before_the_file_is_read(tmp_path, window_s, hop_s, message):
    with pytest.raises(WindowError) as err:
        audio_windows(tmp_path / "never-read.wav", window_s, hop_s)    # the file does not even exist
    assert str(err.value) == message and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_bad_files_get_the_whole_file_decoders_errors(tmp_path):
    def both(path) -> str:
        with pytest.raises(AudioError) as whole:
            load_audio(path, max_seconds=math.inf)
        with pytest.raises(AudioError) as windows:
            list(audio_windows(path, 2.5, 1.25, block_s=0.5))
        assert str(windows.value) == str(whole.value)
        return str(whole.value)

    assert both(tmp_path / "missing.flac") == f"{tmp_path / 'missing.flac'}: no such file"
    write_wav(tmp_path / "good.wav", np.zeros(16000), 16000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "good.wav").read_bytes()[:1000])
    assert both(tmp_path / "cut.wav") == f"{tmp_path / 'cut.wav'}: truncated audio data (header declares 32000 " \
                                         f"bytes, file holds 956)"
    samples = np.zeros((3 * 16000, 2), np.float32)
    samples[40000, 1] = np.inf                       # in the fifth 0.5 s block, on the second channel
    import soundfile

    soundfile.write(tmp_path / "inf.wav", samples, 16000, subtype="FLOAT")   # write_wav refuses non-finite
    assert both(tmp_path / "inf.wav") == f"{tmp_path / 'inf.wav'}: non-finite sample (NaN or inf) at frame 40000"
    write_wav(tmp_path / "zero.wav", np.zeros(0), 16000)
    assert both(tmp_path / "zero.wav") == f"{tmp_path / 'zero.wav'}: no audio samples (0 frames)"
    # no maximum length on this path: 61 s is read (the clip loader's default refuses it)
    write_wav(tmp_path / "long.wav", np.zeros(61 * 8000), 8000, "PCM_U8")
    assert len(list(audio_windows(tmp_path / "long.wav", 30, 30))) == 3
    with pytest.raises(AudioError, match=re.escape("61.00 s long, more than the 60 s maximum")):
        load_audio(tmp_path / "long.wav")


def test_memory_is_bounded_by_the_block_not_the_file(tmp_path):
    """tracemalloc sees numpy's buffers: the reader's peak over a 60 s 48 kHz stereo file with 1 s blocks stays
    a few block sizes (a 1 s stereo float64 block is 0.77 MB), while the whole-file decode holds the file as
    float64 (60 * 48000 * 2 * 8 bytes = 46 MB) at once."""
    import scipy.signal  # noqa: F401 -- imported before tracing: a first import's allocations are not the reader's

    rate, seconds = 48000, 60
    write(tmp_path / "long.wav", recording(rate, seconds, 2), rate)

    def peak(run) -> float:
        tracemalloc.start()
        try:
            run()
            return tracemalloc.get_traced_memory()[1] / 1e6
        finally:
            tracemalloc.stop()

    n_windows = []
    windowed = peak(lambda: n_windows.append(sum(1 for _ in audio_windows(tmp_path / "long.wav", 2.5, 1.25,
                                                                          block_s=1.0))))
    whole = peak(lambda: load_audio(tmp_path / "long.wav", max_seconds=math.inf))
    assert n_windows == [47]                       # 1 + (60 - 2.5) / 1.25
    assert whole > seconds * rate * 2 * 8 / 1e6    # > 46 MB
    assert windowed < 8, (windowed, whole)         # MB


def test_to_mono_16k_is_the_decoders_downmix_and_resampling(tmp_path):
    import soundfile

    write(tmp_path / "r.wav", recording(44100, 1.3, 2), 44100)
    decoded = soundfile.read(tmp_path / "r.wav", dtype="float64")[0]
    np.testing.assert_array_equal(to_mono_16k("r", decoded, 44100), load_audio(tmp_path / "r.wav"))
    np.testing.assert_array_equal(to_mono_16k("m", decoded[:, 0], 16000), decoded[:, 0].astype(np.float32))
    with pytest.raises(AudioError, match=r"^array_3: non-finite sample \(NaN or inf\) at frame 2$"):
        to_mono_16k("array_3", np.array([0.0, 1.0, np.nan]), 8000)
    with pytest.raises(AudioError, match=r"^array_0: no audio samples \(0 frames\)$"):
        to_mono_16k("array_0", np.zeros((0, 2)), 8000)
    with pytest.raises(AudioError, match=r"^array_0: sample rate must be positive, got 0$"):
        to_mono_16k("array_0", np.zeros(4), 0)
