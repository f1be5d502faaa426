"""The decoded-audio store (`avb corpus decode`): equal to decoding the files (int16 where lossless, float32
otherwise), used by the dump and fine-tuning with the same clips and crops, refused once stale, resumable; and
the DataLoader settings around it."""
from __future__ import annotations

import dataclasses
import os
import subprocess

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from helpers import (
    accelerate_command,
    accelerate_launch,
    assert_same_cache,
    subprocess_env,
)
from tiny_model import make_tiny_backbone

import extract.decoded_audio as decoded
from extract.app.cli import main as avb
from extract.audio import load_audio
from extract.clips import (
    ClipDataset,
    EpochShuffleSampler,
    collate_clips,
    default_workers,
    loader_options,
)
from extract.decoded_audio import (
    DecodedAudio,
    DecodedAudioError,
    decode_corpus,
    open_store,
    partial_path,
)
from extract.description import open_corpus
from extract.synth import synthesize_corpus

torch.set_num_threads(1)


def invoke(*args):
    return CliRunner().invoke(avb, [*map(str, args)])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """An A-VB corpus of 16 kHz 16-bit WAVs (int16 store), and the same clips resampled to 48 kHz FLAC in a
    described corpus (float32 store)."""
    root = tmp_path_factory.mktemp("decoded")
    avb_corpus = synthesize_corpus(root / "avb", 24, seed=3, min_seconds=0.6, max_seconds=4.0, progress=False)
    result = invoke("synth", "--out", root / "described", "--layout", "described", "--clips", "24", "--seed", "4",
                    "--max-seconds", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    flac = open_corpus(root / "described")
    for clip in flac.ids[:6]:                       # some clips at 48 kHz stereo: resampled and down-mixed
        path = flac.audio_path(clip)
        wave, rate = soundfile.read(str(path), dtype="float64")
        from scipy.signal import resample_poly
        soundfile.write(str(path), np.stack([resample_poly(wave, 3, 1)] * 2, 1) * 0.9, 48000, subtype="PCM_24")
    return {"avb": avb_corpus, "described": root / "described", "model": make_tiny_backbone(root / "model")}


@pytest.mark.parametrize(("name", "dtype"), [("avb", "int16"), ("described", "float32")])
def test_the_store_holds_exactly_what_decoding_each_file_gives(corpora, tmp_path, name, dtype):
    corpus = open_corpus(corpora[name])
    out = tmp_path / "store.h5"
    result = decode_corpus(corpus, out, progress=False)
    assert result.dtype == dtype and result.clips == len(corpus)
    store = DecodedAudio(out)
    assert store.ids == corpus.ids and store.stale(corpus) is None
    for clip in corpus.ids:
        np.testing.assert_array_equal(store.wave(clip), load_audio(corpus.audio_path(clip)))
    assert store.wave(corpus.ids[0]).dtype == np.float32
    if dtype == "int16":    # half the bytes of float32: 2 per sample
        import h5py
        with h5py.File(out) as f:
            assert f["audio"].dtype == np.int16 and f["audio"].shape[0] == result.samples


@pytest.mark.parametrize("name", ["avb", "described"])
def test_a_dump_from_the_store_equals_the_dump_from_the_files(corpora, tmp_path, name):
    root = corpora[name]
    decode = invoke("corpus", "decode", "--corpus", root, "--no-progress")
    assert decode.exit_code == 0, decode.output
    try:
        args = ["dump", "--corpus", root, "--model", corpora["model"], "--batch-size", "5", "--frame-layers",
                "hidden_1", "--frame-stride", "2"]
        files = invoke(*args, "--out", tmp_path / "files.h5", "--no-decoded-audio", "--no-progress")
        stored = invoke(*args, "--out", tmp_path / "store.h5")
        assert files.exit_code == 0 and stored.exit_code == 0, files.output + stored.output
        assert "reading clips from" in stored.output and "reading clips from" not in files.output
        assert_same_cache(tmp_path / "files.h5", tmp_path / "store.h5")
    finally:
        (root / decoded.STORE_FILE).unlink()


def test_training_crops_from_the_store_and_any_number_of_workers_are_the_files_crops(corpora, tmp_path):
    corpus = open_corpus(corpora["described"])
    decode_corpus(corpus, tmp_path / "s.h5", progress=False)
    store = DecodedAudio(tmp_path / "s.h5")
    rows = np.arange(len(corpus))

    def batches(with_store, workers):
        dataset = ClipDataset(corpus, rows, clip_seconds=1.0, train=True, seed=7, store=store if with_store else None)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_clips,
                                             sampler=EpochShuffleSampler(len(dataset), 7), num_workers=workers)
        out = []
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            out += [(b["waves"].numpy(), b["mask"].numpy(), b["rows"].numpy()) for b in loader]
        return out

    reference = batches(False, 0)
    for with_store, workers in ((True, 0), (True, 2), (False, 2)):
        got = batches(with_store, workers)
        assert len(got) == len(reference)
        for (w, m, r), (w0, m0, r0) in zip(got, reference):
            np.testing.assert_array_equal(r, r0)
            np.testing.assert_array_equal(m, m0)
            np.testing.assert_array_equal(w, w0)
    # the two epochs crop differently (the crops are random, only reproducible)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(reference[:6], reference[6:12]))
def test_a_store_that_no_longer_matches_is_refused_naming_the_clip(corpora, tmp_path):
    corpus = open_corpus(corpora["avb"])
    out = tmp_path / "s.h5"
    decode_corpus(corpus, out, progress=False)
    store = DecodedAudio(out)
    first = corpus.audio_path(corpus.ids[3])
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert store.stale(corpus) == (f"clip {corpus.ids[3]} changed since it was decoded ({first}: modification "
                                       "time; 1 such)")
        with pytest.raises(DecodedAudioError) as err:
            open_store(corpus, str(out))
        assert str(err.value) == (f"{out} no longer matches the corpus: {store.stale(corpus)}; rebuild it (avb corpus "
                                  "decode --rebuild) or pass --no-decoded-audio")
        with pytest.raises(DecodedAudioError, match="pass --rebuild to decode it again"):
            decode_corpus(corpus, out, progress=False)
        assert decode_corpus(corpus, out, rebuild=True, progress=False).clips == len(corpus)
        assert DecodedAudio(out).stale(corpus) is None
    finally:
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fewer = dataclasses.replace(corpus, ids=corpus.ids[:-1])
    assert store.stale(fewer) == f"clip {corpus.ids[-1]} is in the store but no longer in the corpus (1 such)"
    assert open_store(corpus, "none") is None
    with pytest.raises(DecodedAudioError, match="no such file"):
        open_store(corpus, str(tmp_path / "nope.h5"))


def test_a_dump_with_a_stale_store_stops_in_one_line(corpora, tmp_path):
    root = corpora["avb"]
    assert invoke("corpus", "decode", "--corpus", root, "--no-progress").exit_code == 0
    corpus = open_corpus(root)
    path = corpus.audio_path(corpus.ids[0])
    stat = path.stat()
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        result = invoke("dump", "--corpus", root, "--model", corpora["model"], "--out", tmp_path / "c.h5")
        assert result.exit_code == 1
        assert result.output.strip().splitlines()[-1].startswith(
            f"Error: {root / decoded.STORE_FILE} no longer matches the corpus: clip {corpus.ids[0]} changed")
        assert not (tmp_path / "c.h5").exists()
        check = invoke("corpus", "check", root)
        assert "does NOT match the corpus" in check.output
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        (root / decoded.STORE_FILE).unlink()


def kill_a_decode_after_ten_clips(corpus, out, monkeypatch) -> None:
    """A decode of `corpus` into `out` interrupted (KeyboardInterrupt) as it reads its eleventh clip."""
    real, calls = decoded._samples, []

    def dies_after_ten(path, dtype):
        calls.append(path)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(path, dtype)

    with monkeypatch.context() as patch:
        patch.setattr(decoded, "_samples", dies_after_ten)
        with pytest.raises(KeyboardInterrupt):
            decode_corpus(corpus, out, progress=False)
    assert not out.exists() and partial_path(out).is_file()


def test_a_killed_decode_resumes_from_the_clips_it_wrote(corpora, tmp_path, monkeypatch):
    corpus = open_corpus(corpora["described"])
    out = tmp_path / "s.h5"
    kill_a_decode_after_ten_clips(corpus, out, monkeypatch)
    result = decode_corpus(corpus, out, progress=False)
    assert result.resumed_from == 10 and not partial_path(out).exists()
    decode_corpus(corpus, tmp_path / "fresh.h5", progress=False)
    resumed, fresh = DecodedAudio(out), DecodedAudio(tmp_path / "fresh.h5")
    for clip in corpus.ids:
        np.testing.assert_array_equal(resumed.wave(clip), fresh.wave(clip))


def store_contents(path):
    import h5py

    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}, dict(f.attrs)


def test_under_accelerate_launch_rank_0_alone_decodes_and_the_others_wait_then_check(corpora, tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2 -m extract.decode` for real (gloo): rank 0 resumes a killed
    decode and writes the store that one process writes; rank 1 waits, then checks it; one line says so. An
    error of rank 0 stops both ranks in one line each, and the store it refused is left as it was."""
    root = corpora["described"]
    corpus = open_corpus(root)
    decode_corpus(corpus, tmp_path / "one.h5", progress=False)
    two = tmp_path / "launched" / "store.h5"        # a folder of its own: anything left beside the store shows
    two.parent.mkdir()
    kill_a_decode_after_ten_clips(corpus, two, monkeypatch)

    args = ["--corpus", str(root), "--out", str(two), "--no-progress"]
    proc = accelerate_launch("extract.decode", args, 2, tmp_path, timeout=120)
    said = proc.stdout.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"wrote {two} ({len(corpus)} clips, "), proc.stdout
    assert said[0].endswith(", resumed after 10); rank 0 wrote it, the other 1 of 2 processes waited and checked it")
    assert sorted(os.listdir(two.parent)) == ["store.h5"]   # no partial, temporary or lock file left
    (data, attrs), (data1, attrs1) = store_contents(two), store_contents(tmp_path / "one.h5")
    assert attrs == attrs1 and attrs["complete"] and sorted(data) == sorted(data1)
    for name in data:
        np.testing.assert_array_equal(data[name], data1[name])

    # rank 0 refuses a store of another corpus: both ranks stop (rank 1 with rank 0's line), nothing waits
    other = ["--corpus", str(corpora["avb"]), "--out", str(two), "--no-progress"]
    failed = subprocess.run(accelerate_command("extract.decode", 2) + other, cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "wrote" not in failed.stdout
    refusal = f"{two} no longer matches the corpus: clip "
    errors = [line for line in failed.stderr.splitlines() if line.startswith("Error:")]
    assert sum(line.startswith(f"Error: {refusal}") for line in errors) == 1, failed.stderr[-3000:]
    # rank 1's relayed line (unless the launcher stopped it first, once rank 0 had exited)
    assert all(line.startswith((f"Error: {refusal}", f"Error: rank 0 of 2 processes, which decodes for all of "
                                f"them, stopped: {refusal}")) for line in errors), errors
    assert "decoded_audio.py" not in failed.stderr          # no traceback of this code
    assert sorted(os.listdir(two.parent)) == ["store.h5"]
    np.testing.assert_array_equal(store_contents(two)[0]["audio"], data["audio"])


def test_loader_workers_come_from_the_machine_on_a_gpu_and_are_zero_on_a_cpu(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers(cuda) == 7                    # 16 cores / 2 processes, less the GPU's driver
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(cuda) == 8                    # capped
    assert default_workers(torch.device("cpu")) == 0
    assert loader_options(-1, cuda) == {"num_workers": 8, "persistent_workers": True, "prefetch_factor": 4,
                                        "pin_memory": True}
    assert loader_options(0, torch.device("cpu")) == {"num_workers": 0}
