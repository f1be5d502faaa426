"""The bad-input table (README "Bad input"): every row is a test here or names the existing test that covers it.

Each case feeds one broken (or merely unusual) input through the public entry point a user would hit -- mostly
the `avb` CLI via CliRunner -- and asserts the exact one-line error and exit code, or that the unusual input is
handled gracefully (converted / ignored) with the same result as the clean input. What the module tests already
assert at the function level is not repeated; the CLI-level view (exit code, one line, no traceback) is.
"""
from __future__ import annotations

import ast
import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from scipy.io import wavfile

from cache.reader import (
    CacheError,
    FrameReader,
    check_compatible,
    compat_attrs,
    load_cache,
    read_attrs,
)
from cache.writer import CacheWriter
from extract.app.cli import main
from extract.audio import SAMPLE_RATE, AudioError, load_audio, write_wav
from extract.corpus import read_corpus
from extract.synth import synthesize_corpus

REPO = Path(__file__).resolve().parents[1]
N_CLIPS = 12


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base_corpus(tmp_path_factory) -> Path:
    """A small generated corpus in the official layout (all five label files, 16 kHz mono 16-bit wavs)."""
    return synthesize_corpus(tmp_path_factory.mktemp("bad_input") / "base", clips=N_CLIPS, seed=3,
                             min_seconds=0.5, max_seconds=0.6, progress=False)


@pytest.fixture
def corpus(base_corpus: Path, tmp_path: Path) -> Path:
    """A private copy of the base corpus that a test may break."""
    return Path(shutil.copytree(base_corpus, tmp_path / "corpus"))


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def fails_with(result, message: str, code: int = 1) -> None:
    """A ClickException: the given exit code, nothing but `Error: <message>` on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr == f"Error: {message}\n"


def usage_error(result, message: str) -> None:
    """A click usage error: exit code 2, usage text, then the one error line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("Usage: ")
    assert result.stderr.rstrip("\n").splitlines()[-1] == f"Error: {message}"


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def write_rows(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = False, crlf: bool = False) -> None:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(header)
        writer.writerows(rows)


def first_row(path: Path, split: str) -> tuple[int, list[str]]:
    """(line number with header = 1, cells) of the first row of `split` in a label file."""
    header, rows = read_rows(path)
    col = header.index("Split")
    k = next(i for i, r in enumerate(rows) if r[col] == split)
    return k + 2, rows[k]


def wav_of(root: Path, file_id: str) -> Path:
    return root / "audio" / "wav" / f"{file_id.strip('[]')}.wav"


def check_json(root: Path) -> dict:
    result = invoke("corpus", "check", root, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("root", "label_files"):
        summary.pop(key)
    return summary


# ---------------------------------------------------------------------------------------------- audio
def test_empty_zero_sample_truncated_and_non_wav_files_are_listed_by_corpus_check(corpus):
    wav = corpus / "audio" / "wav"
    good = (wav / "00001.wav").read_bytes()
    (wav / "00002.wav").write_bytes(b"")                                     # empty file
    write_wav(wav / "00003.wav", np.zeros(0), SAMPLE_RATE, "PCM_16")         # header only, 0 samples
    (wav / "00004.wav").write_bytes(good[:30])                               # header cut inside fmt
    (wav / "00005.wav").write_bytes(good[:1000])                             # data chunk cut short
    (wav / "00006.wav").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(200))  # an mp3 named .wav
    reasons = {
        "00002": "empty file (0 bytes)",
        "00003": "no audio samples (0 frames)",
        "00004": "truncated header (fmt chunk of 10 bytes)",
        "00005": f"truncated audio data (header declares {len(good) - 44} bytes, file holds {1000 - 44})",
        "00006": "not a WAV file (starts with b'ID3\\x04', expected b'RIFF'...b'WAVE')",
    }
    result = invoke("corpus", "check", corpus)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "unreadable wav files: 5" in lines
    for clip, reason in reasons.items():  # the first five unreadable files are listed with their reason
        assert f"  {wav / (clip + '.wav')}: {reason}" in lines
    assert result.stderr == f"Error: 0 missing and 5 unreadable wav files (first: {wav / '00002.wav'})\n"
    for clip, reason in reasons.items():  # load_audio (fine-tuning, dump, predict) says the same, in one line
        with pytest.raises(AudioError) as err:
            load_audio(wav / f"{clip}.wav")
        assert str(err.value) == f"{wav / (clip + '.wav')}: {reason}"


def test_nan_and_inf_samples_pass_the_header_audit_but_not_the_clip_loader(corpus):
    from extract.clips import ClipDataset

    wav = corpus / "audio" / "wav"
    for clip, bad in (("00007", np.nan), ("00008", np.inf)):
        samples = np.zeros(4000, np.float32)
        samples[1234] = bad
        wavfile.write(wav / f"{clip}.wav", SAMPLE_RATE, samples)  # write_wav refuses non-finite samples
    assert check_json(corpus)["audio"]["n_unreadable"] == 0  # headers are fine: corpus check does not decode
    data = read_corpus(corpus)
    for clip in ("00007", "00008"):
        with pytest.raises(AudioError) as err:
            ClipDataset(data, [data.ids.index(clip)])[0]
        assert str(err.value) == f"{wav / (clip + '.wav')}: non-finite sample (NaN or inf) at frame 1234"


def test_clip_longer_than_60_s_is_refused(corpus):
    long = corpus / "audio" / "wav" / "00009.wav"
    write_wav(long, np.zeros(61 * 8000), 8000, "PCM_U8")  # small on disk, 61 s long
    result = invoke("corpus", "check", corpus)
    assert result.exit_code == 1
    assert f"  {long}: 61.00 s long, more than the 60 s maximum" in result.stdout.splitlines()
    with pytest.raises(AudioError) as err:
        load_audio(long)
    assert str(err.value) == f"{long}: clip is 61.00 s long, more than the 60 s maximum"


def test_8_bit_24_bit_float_stereo_and_44k1_wavs_are_converted(corpus):
    """Graceful: every encoding decodes to the same 16 kHz mono float signal as a clean reference."""
    t16 = np.arange(4000) / SAMPLE_RATE
    reference = 0.5 * np.sin(2 * np.pi * 440 * t16)
    t44 = np.arange(11025) / 44100
    wav = corpus / "audio" / "wav"
    variants = {  # clip -> (wave, rate, subtype, tolerance)
        "00001": (reference, SAMPLE_RATE, "PCM_U8", 1 / 128 + 1e-6),
        "00002": (reference, SAMPLE_RATE, "PCM_24", 2.0 ** -23 + 1e-7),
        "00003": (reference, SAMPLE_RATE, "FLOAT", 1e-7),
        "00004": (np.stack([reference + 0.25, reference - 0.25], 1), SAMPLE_RATE, "PCM_16", 2.0 ** -15 + 1e-7),
        "00005": (0.5 * np.sin(2 * np.pi * 440 * t44), 44100, "PCM_16", 2e-3),
    }
    for clip, (wave, rate, subtype, _) in variants.items():
        write_wav(wav / f"{clip}.wav", wave, rate, subtype)
    for clip, (_, _, subtype, tol) in variants.items():
        got = load_audio(wav / f"{clip}.wav")
        assert got.dtype == np.float32 and got.shape == reference.shape, (clip, got.shape)
        core = slice(200, -200)  # away from the resampler's edge transients
        np.testing.assert_allclose(got[core], reference[core], atol=tol, err_msg=f"{clip} {subtype}")
    audio = check_json(corpus)["audio"]
    assert audio["n_unreadable"] == 0 and audio["n_missing"] == 0
    assert audio["sample_rates"] == {"16000": N_CLIPS - 1, "44100": 1}
    assert audio["channels"] == {"1": N_CLIPS - 1, "2": 1}


# ---------------------------------------------------------------------------------------------- label CSVs
def test_bom_crlf_and_extra_columns_are_handled_gracefully(base_corpus, corpus):
    reference = check_json(base_corpus)
    for path in sorted((corpus / "labels").glob("*.csv")):
        header, rows = read_rows(path)
        header = ["Notes"] + header + ["Rater_Count"]
        rows = [['said "ha", then laughed'] + r + ["7"] for r in rows]  # quoted comma in an extra column
        write_rows(path, header, rows, bom=True, crlf=True)
    assert (corpus / "labels" / "two_info.csv").read_bytes().startswith(b"\xef\xbb\xbfNotes,File_ID")
    assert b"\r\n" in (corpus / "labels" / "two_info.csv").read_bytes()
    assert check_json(corpus) == reference
    a, b = read_corpus(base_corpus), read_corpus(corpus)
    assert a.ids == b.ids and a.countries == b.countries
    for task in a.labels:
        np.testing.assert_array_equal(a.labels[task], b.labels[task])


def test_required_column_missing(corpus):
    path = corpus / "labels" / "two_info.csv"
    header, rows = read_rows(path)
    col = header.index("Arousal")
    write_rows(path, header[:col] + header[col + 1:], [r[:col] + r[col + 1:] for r in rows])
    fails_with(invoke("corpus", "check", corpus), f"{path}: required column 'Arousal' is missing")


def test_non_utf8_label_file(corpus):
    path = corpus / "labels" / "type_info.csv"
    path.write_bytes(path.read_bytes().replace(b"Test,", "Tést,".encode("latin-1"), 1))
    fails_with(invoke("corpus", "check", corpus), f"{path}: not a UTF-8 text file")


@pytest.mark.parametrize("bad_id, reason", [("[../x]", "'/'"), ("[a/b]", "'/'"), ("[..]", "'..'")])
def test_file_id_escaping_audio_wav(corpus, bad_id, reason):
    path = corpus / "labels" / "type_info.csv"
    header, rows = read_rows(path)
    rows[4][header.index("File_ID")] = bad_id
    write_rows(path, header, rows)
    fails_with(invoke("corpus", "check", corpus),
               f"{path}, row 6: File_ID {bad_id!r} cannot name a file under audio/wav (contains {reason})")


def test_duplicate_file_id(corpus):
    path = corpus / "labels" / "type_info.csv"
    header, rows = read_rows(path)
    write_rows(path, header, rows + [rows[2]])
    fails_with(invoke("corpus", "check", corpus),
               f"{path}, row {len(rows) + 2}: duplicate File_ID {rows[2][0]!r} (first at row 4)")


def test_unknown_split(corpus):
    path = corpus / "labels" / "type_info.csv"
    header, rows = read_rows(path)
    rows[0][header.index("Split")] = "validation"
    write_rows(path, header, rows)
    fails_with(invoke("corpus", "check", corpus),
               f"{path}, row 2 (File_ID {rows[0][header.index('File_ID')]}), column Split: unknown split "
               "'validation' (expected Train, Val or Test)")


def test_unknown_voc_type(corpus):
    path = corpus / "labels" / "type_info.csv"
    line, _ = first_row(path, "Train")
    header, rows = read_rows(path)
    rows[line - 2][header.index("Voc_Type")] = "laugh"  # case matters
    write_rows(path, header, rows)
    fails_with(invoke("corpus", "check", corpus),
               f"{path}, row {line} (File_ID {rows[line - 2][0]}), column Voc_Type: unknown vocal type 'laugh' "
               "(expected one of Gasp, Laugh, Cry, Scream, Grunt, Groan, Pant, Other)")


@pytest.mark.parametrize("value, problem", [
    ("NaN", "not a finite number: 'NaN'"), ("1.5", "value 1.5 is outside [0, 1]"),
    ("-1e-3", "value -1e-3 is outside [0, 1]"), ("", "empty label for a Train clip"),
])
def test_nan_or_out_of_range_label_in_train(corpus, value, problem):
    path = corpus / "labels" / "two_info.csv"
    line, _ = first_row(path, "Train")
    header, rows = read_rows(path)
    rows[line - 2][header.index("Arousal")] = value
    write_rows(path, header, rows)
    fails_with(invoke("corpus", "check", corpus), f"{path}, row {line} (File_ID {rows[line - 2][0]}), column "
                                                  f"Arousal: {problem}")


def test_nonexistent_corpus_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    fails_with(invoke("corpus", "check", missing), f"{missing}: no such corpus directory")
    pred = tmp_path / "p.csv"
    pred.write_text("File_ID,Valence,Arousal\n[00001],0.5,0.5\n")
    fails_with(invoke("score", "--corpus", missing, pred), f"{missing}: no such corpus directory")


# ---------------------------------------------------------------------------------------------- predictions
@pytest.fixture(scope="module")
def val_ids(base_corpus) -> list[str]:
    header, rows = read_rows(base_corpus / "labels" / "two_info.csv")
    return sorted(r[0][1:-1] for r in rows if r[header.index("Split")] == "Val")


def two_csv(path: Path, ids: list[str], header: str = "File_ID,Valence,Arousal", cells=None) -> Path:
    cells = cells or {}
    lines = [header] + [f"[{i}],{cells.get(i, '0.25,0.75')}" for i in ids]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_predictions_with_missing_or_extra_ids(base_corpus, val_ids, tmp_path):
    short = two_csv(tmp_path / "short.csv", val_ids[1:])
    fails_with(invoke("score", "--corpus", base_corpus, short),
               f"{short}: File_ID [{val_ids[0]}] of the Val split has no prediction (1 missing)")
    extra = two_csv(tmp_path / "extra.csv", val_ids + ["99999", "99998"])
    fails_with(invoke("score", "--corpus", base_corpus, extra),
               f"{extra}: File_ID [99999] is not in the Val split (2 such ids)")
    dup = tmp_path / "dup.csv"
    dup.write_text(two_csv(tmp_path / "x.csv", val_ids).read_text() + f"[{val_ids[0]}],0.1,0.1\n")
    fails_with(invoke("score", "--corpus", base_corpus, dup),
               f"{dup}, row {len(val_ids) + 2}: duplicate File_ID '[{val_ids[0]}]'")
    good = two_csv(tmp_path / "good.csv", val_ids)
    assert invoke("score", "--corpus", base_corpus, good).exit_code == 0


@pytest.mark.parametrize("header, shown", [
    ("File_ID,Arousal,Valence", "Arousal, Valence"),                  # official columns, wrong order
    ("File_ID,Valence,Arousal,Confidence", "Valence, Arousal, Confidence"),
    ("File_ID,valence,arousal", "valence, arousal"),                  # names are case-sensitive
])
def test_predictions_with_wrong_columns(base_corpus, val_ids, tmp_path, header, shown):
    path = two_csv(tmp_path / "p.csv", val_ids, header=header)
    fails_with(invoke("score", "--corpus", base_corpus, path),
               f"{path}: columns {shown} match no A-VB task (expected the official columns in the official order)")


def test_predictions_without_file_id_column(base_corpus, val_ids, tmp_path):
    path = two_csv(tmp_path / "p.csv", val_ids, header="id,Valence,Arousal")
    fails_with(invoke("score", "--corpus", base_corpus, path), f"{path}: first column must be 'File_ID', found 'id'")


@pytest.mark.parametrize("cell, problem", [
    ("0.5,high", "not a number: 'high'"), ("0.5,", "not a number: ''"),
    ("0.5,inf", "not a finite number: 'inf'"), ("0,5,0.5", None),
])
def test_predictions_with_non_numeric_cells(base_corpus, val_ids, tmp_path, cell, problem):
    path = two_csv(tmp_path / "p.csv", val_ids, cells={val_ids[2]: cell})
    message = (f"{path}, row 4 (File_ID [{val_ids[2]}]), column Arousal: {problem}" if problem
               else f"{path}, row 4 (File_ID [{val_ids[2]}]): 4 cells, expected 3")  # a decimal comma splits the cell
    fails_with(invoke("score", "--corpus", base_corpus, path), message)


def test_prediction_file_that_does_not_exist(base_corpus, tmp_path):
    missing = tmp_path / "nope.csv"
    fails_with(invoke("score", "--corpus", base_corpus, missing), f"{missing}: no such file")


# ---------------------------------------------------------------------------------------------- cache
DIMS = {"cnn": 6, "hidden_0": 4, "hidden_1": 4}
ATTRS = {"backbone": {"name_or_path": "tiny", "model_type": "wav2vec2", "config": {"num_hidden_layers": 1}},
         "sample_rate": 16000, "clip_seconds": 2.5}


def write_cache(path: Path, n: int = 24, attrs=ATTRS, dims=DIMS) -> Path:
    rng = np.random.default_rng(0)
    with CacheWriter(path, layer_dims=dims, label_columns={"two": ["Valence", "Arousal"]}, attrs=attrs,
                     frame_layers=["hidden_1"], frame_stride=2, chunk_rows=4) as w:
        n_frames = rng.integers(1, 9, n).astype(np.int32)
        w.append([f"{i:05d}" for i in range(n)], [("Train", "Val", "Test")[i % 3] for i in range(n)],
                 {"two": rng.random((n, 2)).astype(np.float32)}, n_frames,
                 {k: rng.normal(size=(n, d)).astype(np.float32) for k, d in dims.items()},
                 {"hidden_1": [rng.normal(size=(-(-t // 2), 4)).astype(np.float32) for t in n_frames]})
    return path


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "good.h5")


def test_cache_truncated_mid_write(good_cache, tmp_path):
    raw = good_cache.read_bytes()
    cut = tmp_path / "cut.h5"
    for size in (8, 600, len(raw) // 3, len(raw) // 2, len(raw) - 1):
        cut.write_bytes(raw[:size])
        result = invoke("cache", "info", cut)
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, (size, result.output)
        assert result.stderr.startswith(f"Error: {cut} cannot be opened: the HDF5 file is truncated or corrupt ("), size
        with pytest.raises(CacheError, match=re.escape(f"{cut} cannot be opened: the HDF5 file is truncated")):
            load_cache(cut)
    cut.write_bytes(raw[:7])  # shorter than the HDF5 signature
    fails_with(invoke("cache", "info", cut), f"{cut} is not an HDF5 file")


def test_cache_with_damaged_bytes_inside(good_cache, tmp_path):
    """Bit rot in an index structure surfaces only when data is read; it must still be a one-line CacheError."""
    raw = good_cache.read_bytes()
    bad = tmp_path / "bad.h5"
    hits = 0
    for signature in (b"TREE", b"HEAP", b"SNOD", b"GCOL"):
        for at in [m.start() for m in re.finditer(re.escape(signature), raw)]:
            bad.write_bytes(raw[:at] + b"XXXX" + raw[at + 4:])
            for read in (load_cache, lambda p: FrameReader(p).get(range(24)), lambda p: FrameReader(p).load_all()):
                try:
                    read(bad)
                except CacheError as err:
                    hits += 1
                    assert str(err).startswith(f"{bad} ") and "\n" not in str(err), str(err)
            result = invoke("cache", "info", bad)
            assert result.exception is None or isinstance(result.exception, SystemExit), (signature, at,
                                                                                          repr(result.exception))
            if result.exit_code:
                assert result.exit_code == 1 and result.stderr.startswith(f"Error: {bad} ")
                assert len(result.stderr.splitlines()) == 1
    assert hits >= 4  # the corruptions really were noticed, not silently read


WRITER_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from cache.writer import CacheWriter
    with CacheWriter(sys.argv[1], layer_dims={"cnn": 3}, label_columns={}, chunk_rows=2,
                     attrs={"backbone": {}, "sample_rate": 16000, "clip_seconds": 2.5}) as w:
        for i in range(5):
            w.append([f"c{i}"], ["Train"], {}, np.array([3]), {"cnn": np.ones((1, 3), np.float32)})
        os.kill(os.getpid(), signal.SIGKILL)  # like an OOM kill or a pre-empted node: no cleanup runs
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_cache_writer_killed_before_close(tmp_path):
    final = tmp_path / "feats.h5"
    proc = subprocess.run([sys.executable, "-c", WRITER_SCRIPT, str(final)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not final.exists()
    (tmp,) = [p for p in tmp_path.iterdir()]
    assert tmp.name.startswith(".feats.h5.tmp-") and tmp.suffix == ".h5"
    fails_with(invoke("cache", "info", final), f"{final}: no such file")
    result = invoke("cache", "info", tmp)  # even pointed at the temp file, nobody takes it for a cache
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert re.fullmatch(re.escape(f"Error: {tmp} ") + r"(cannot be opened: the HDF5 file is truncated or corrupt "
                        r"\(.*\)|is incomplete: attribute 'n_clips' is missing \(was it interrupted\?\)"
                        r"|is not an HDF5 file)\n",
                        result.stderr), result.stderr
    write_cache(final, n=6)  # the rerun succeeds and its file is complete
    assert load_cache(final).ids.tolist() == [f"{i:05d}" for i in range(6)]


def _retag(src: Path, dst: Path, **attrs) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value
    return dst


def test_cache_with_other_format_version_or_without_n_clips(good_cache, tmp_path):
    v2 = _retag(good_cache, tmp_path / "v2.h5", format_version=2)
    fails_with(invoke("cache", "info", v2), f"{v2} has unsupported format_version 2 (this code reads 1)")
    partial = _retag(good_cache, tmp_path / "partial.h5", n_clips=None)
    fails_with(invoke("cache", "info", partial),
               f"{partial} is incomplete: attribute 'n_clips' is missing (was it interrupted?)")
    with pytest.raises(CacheError, match=re.escape(f"{partial} is incomplete")):
        load_cache(partial)


def test_non_hdf5_bytes_and_foreign_hdf5_as_cache(corpus, tmp_path):
    wav = corpus / "audio" / "wav" / "00001.wav"
    fails_with(invoke("cache", "info", wav), f"{wav} is not an HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    fails_with(invoke("cache", "info", foreign),
               f"{foreign} is not an avb feature cache (attribute 'format' is None, expected 'avb-feature-cache')")
    fails_with(invoke("cache", "info", tmp_path), f"{tmp_path} is a directory, not a cache file")


def test_cache_from_another_backbone_or_layer_set(good_cache, tmp_path):
    expected = json.loads(json.dumps(compat_attrs(read_attrs(good_cache))))  # as stored in a run's config
    check_compatible(read_attrs(good_cache), expected)
    deeper = write_cache(tmp_path / "deeper.h5", attrs={**ATTRS, "backbone": {
        **ATTRS["backbone"], "config": {"num_hidden_layers": 12}}})
    with pytest.raises(CacheError) as err:
        check_compatible(read_attrs(deeper), expected, source=deeper)
    assert str(err.value) == (f"{deeper}: cache attribute 'backbone.config.num_hidden_layers' is 12, but 1 is "
                              "expected (features from a different backbone or layer set)")
    fewer = write_cache(tmp_path / "fewer.h5", dims={"cnn": 6, "hidden_1": 4})
    with pytest.raises(CacheError) as err:
        check_compatible(read_attrs(fewer), expected, source=fewer)
    assert str(err.value) == (f"{fewer}: cache attribute 'layers' is ['cnn', 'hidden_1'], but "
                              "['cnn', 'hidden_0', 'hidden_1'] is expected (features from a different backbone "
                              "or layer set)")


# ---------------------------------------------------------------------------------------------- CLI misuse
def test_cli_misuse_is_a_usage_error_with_exit_code_2(base_corpus, tmp_path):
    usage_error(invoke("nosuch"), "No such command 'nosuch'.")
    usage_error(invoke("score", tmp_path / "p.csv"), "Missing option '--corpus'.")
    usage_error(invoke("score", "--corpus", base_corpus), "Missing argument 'PREDICTIONS...'.")
    usage_error(invoke("score", "--corpus", base_corpus, "--split", "Test", tmp_path / "p.csv"),
                "Invalid value for '--split': 'Test' is not one of 'Train', 'Val'.")
    usage_error(invoke("cache", "info"), "Missing argument 'FILE'.")
    wav = base_corpus / "audio" / "wav" / "00001.wav"
    usage_error(invoke("corpus", "check", wav), f"Invalid value for 'ROOT': Directory '{wav}' is a file.")
    result = invoke("corpus", "check", base_corpus, "--bogus")     # click's own wording differs between releases
    usage_error(result, result.stderr.rstrip("\n").splitlines()[-1][len("Error: "):])
    assert re.fullmatch(r"Error: No such option:? '?--bogus'?\.?", result.stderr.rstrip("\n").splitlines()[-1])


# ---------------------------------------------------------------------------------------------- safe loading
_PICKLE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib")


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, what) for every way `source` could deserialise or run code from a file a user hands in."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a file being edited: fall back to a plain grep of the code part of each line
        patterns = (r"\bpickle", r"(?<![\w.])(eval|exec)\(", r"\byaml\.(unsafe_|full_)?load\(",
                    r"torch\.load\((?![^)]*weights_only\s*=\s*True)")
        return [(n, line.strip()) for n, line in enumerate(source.splitlines(), 1)
                if any(re.search(p, line.split("#")[0]) for p in patterns)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] in _PICKLE_MODULES or a.name == "yaml"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in _PICKLE_MODULES:
                found.append((node.lineno, f"from {node.module} import"))
            if root in ("torch", "yaml") and any(a.name in ("load", "unsafe_load", "full_load") for a in node.names):
                found.append((node.lineno, f"from {node.module} import load"))
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower():
                found.append((node.lineno, name))
        elif isinstance(node, ast.Call):
            func = node.func
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append((node.lineno, f"{func.id}("))
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner, attr = func.value.id, func.attr
                weights_only = kwargs.get("weights_only")
                if owner == "torch" and attr == "load" and not (
                        isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append((node.lineno, "torch.load( without weights_only=True"))
                if owner == "yaml" and attr in ("load", "unsafe_load", "full_load", "load_all"):
                    found.append((node.lineno, f"yaml.{attr}("))
            allow = kwargs.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append((node.lineno, "allow_pickle="))
    return sorted(found)


def test_the_safe_loading_check_catches_each_pattern():
    bad = {
        "import pickle": "import pickle",
        "from joblib import load": "from joblib import",
        "x = torch.load(p)": "torch.load( without weights_only=True",
        "x = torch.load(p, weights_only=False)": "torch.load( without weights_only=True",
        "x = eval(text)": "eval(",
        "exec(code)": "exec(",
        "cfg = yaml.load(f)": "yaml.load(",
        "a = np.load(p, allow_pickle=True)": "allow_pickle=",
        "df = pd.read_pickle(p)": "read_pickle",
    }
    for code, what in bad.items():
        assert [w for _, w in unsafe_loads(code)] == [what], code
    ok = ("model.eval()\nx = torch.load(p, map_location='cpu', weights_only=True)\ncfg = yaml.safe_load(f)\n"
          "a = np.load(p, allow_pickle=False)\ns = 'no pickle, eval( or exec( in strings'\n# torch.load(p)\n")
    assert unsafe_loads(ok) == []
    broken = "def broken(:\n    return pickle.loads(b)  # eval(x)\n"  # unparsable: the grep fallback
    assert unsafe_loads(broken) == [(2, "return pickle.loads(b)  # eval(x)")]


def test_project_source_never_loads_unsafely():
    offences = []
    for package in ("extract", "heads", "cache"):
        for path in sorted((REPO / package).rglob("*.py")):
            for line, what in unsafe_loads(path.read_text(encoding="utf-8")):
                offences.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert offences == [], "unsafe deserialisation or code execution:\n" + "\n".join(offences)
    assert len(list((REPO / "extract").rglob("*.py"))) >= 5  # the walk really saw the source tree
